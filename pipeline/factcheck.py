"""Captions against measured facts: what a caption claims, whether the audio contradicts it,
and captions written from the facts themselves.

- `extract_claims(text)`: stated BPM, tempo words (slow, fast, ...) as BPM ranges, key and
  mode, drums present or absent.
- `confident_facts(facts, cfg)`: the measured facts sure enough to check against and to give
  an LLM as data (tempo, key, drums); the rest is left out, never guessed.
- `check(text, facts, cfg)`: the reasons (`contradicts_tempo`, `contradicts_key`,
  `contradicts_drums`) why `text` contradicts the confident facts; [] when it does not.
  A stated tempo agrees with the measured one, its half or its double (tempo estimators and
  listeners disagree by octaves); a stated key agrees with the measured key or, by default,
  its relative major/minor (they share every note, and profiles confuse them); where no key
  is sure but the music is tonal, a stated key is still refuted when no key it accepts fits
  the notes that sound (the pitch-class profile). A BPM is only
  *stated* (to the LLM, in the facts sentence or a caption made from the facts) when its
  octave is sure too (`tempo_octave_confidence`), so mosaiq does not write half-time BPMs.
- `facts_sentence(facts, cfg)`: a short sentence of confident facts to append to a prompt, as
  MusicBench does ("The bpm is 120. The key is A minor. It has drums.").
- `fallback_caption(facts, cfg, tags)`: a caption from the confident facts for a clip with no
  usable caption ("" when no fact is confident).

`facts` is any mapping with the column names of `schemas.facts` (a row of the analyze table).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from pipeline import facts as FX
from schemas import facts as F


@dataclass(frozen=True)
class FactCheckConfig:
    """Which facts count as confident, and how far a claim may be from a measurement."""

    tempo_min_confidence: float = 0.3  # pulse clarity (facts.tempo): right up to an octave, 0..1
    # a BPM is *stated* (to the LLM, in a facts sentence or a caption made from the facts) only
    # when the octave is sure too; checking a caption's BPM needs no octave (half/double agree)
    tempo_octave_min_confidence: float = 0.7
    key_min_confidence: float = 0.7  # correlation with the best key profile, 0..1 (r >= 0.7: about half the chroma's variance)
    # ... in tonal music: at least this share of the pitch-class profile on that key's seven
    # notes. A correlation says nothing of how far the profile is from flat: noise and drum
    # loops hold 7/12 (0.583) by chance, 0.57-0.61 measured, and white noise can correlate at
    # 0.74 with some key; generated music holds 0.59-0.97 (docs/facts.md)
    key_min_in_scale: float = 0.6
    # the percussive ratio is the energy share of noise-like percussive transients (snare, hats,
    # claps), the kick ratio that of low ones (a kick drum; docs/facts.md); a plucked or struck
    # instrument leaves a little of the first, so only its ends are sure (on five generated
    # seeds a Karplus-Strong pluck's noise attack reaches 0.0034 with no kit). A loud plucked
    # bass reaches a kick ratio of 0.025 with no kit, as much as a real 808 loop's 0.035, so
    # the kick ratio never makes drums sure; it only keeps "no drums" from being sure
    drums_present_ratio: float = F.DRUMS_SURE_RATIO  # percussive ratio at or above: drums, confidently
    drums_absent_ratio: float = 0.0005  # at or below, with the kick ratio at or below kick_absent_ratio: no drums
    kick_absent_ratio: float = 0.003  # (in between: not sure)
    # defects that hide or fake broadband transients: with any of them, drums are not sure; a
    # band-limited clip keeps little of a snare's spread, so there only "drums" can be sure
    drums_unsure_defects: tuple[str, ...] = (F.NOISY, F.CLIPPING)
    drums_absence_unsure_defects: tuple[str, ...] = (F.BAND_LIMITED,)
    tempo_tolerance: float = 0.08  # a stated BPM within 8 % of the measured one agrees
    half_double: bool = True  # ... or within 8 % of its half or its double
    relative_key: bool = True  # a stated key agrees with the measured key's relative major/minor
    fifth_keys: bool = True  # ... and with the keys a fifth above and below (and their relatives): the
    # key finder's most common confusions, so a truthful caption is not called wrong (docs/facts.md)
    # a key claim is refuted by the notes themselves, even when no key is sure, where the music is
    # tonal (key_min_in_scale, and some key correlates with the profile at least key_refute_min_fit)
    # and no key the claim accepts (itself and, as configured, its relative and fifths) reaches
    # key_refute_max_r: a claim a tritone off correlates at about -0.25, a true one at 0.4 or more
    key_refute_max_r: float = 0.2
    key_refute_min_fit: float = 0.5
    slow_bpm: tuple[float, float] = (40.0, 100.0)  # "slow", "downtempo", "adagio", ...
    mid_bpm: tuple[float, float] = (80.0, 135.0)  # "mid-tempo", "moderate tempo", "andante", ...
    fast_bpm: tuple[float, float] = (115.0, 240.0)  # "fast", "uptempo", "allegro", ...

    def __post_init__(self):
        if not 0 <= self.tempo_octave_min_confidence <= 1:
            raise ValueError(f"tempo_octave_min_confidence must be in [0, 1], got {self.tempo_octave_min_confidence}")
        if not 0 <= self.drums_absent_ratio < self.drums_present_ratio <= 1:
            raise ValueError(f"need 0 <= drums_absent_ratio < drums_present_ratio <= 1, got "
                             f"{self.drums_absent_ratio}, {self.drums_present_ratio}")
        if not 0 <= self.kick_absent_ratio <= 1:
            raise ValueError(f"kick_absent_ratio must be in [0, 1], got {self.kick_absent_ratio}")
        if not 7 / 12 <= self.key_min_in_scale <= 1:
            raise ValueError(f"key_min_in_scale must be in [7/12, 1] (7/12: any profile is tonal), got {self.key_min_in_scale}")
        if not -1 <= self.key_refute_max_r < self.key_refute_min_fit <= 1:
            raise ValueError(f"need -1 <= key_refute_max_r < key_refute_min_fit <= 1, got "
                             f"{self.key_refute_max_r}, {self.key_refute_min_fit}")
        if not 0 < self.tempo_tolerance < 0.5:
            raise ValueError(f"tempo_tolerance must be in (0, 0.5), got {self.tempo_tolerance}")
        for name in ("slow_bpm", "mid_bpm", "fast_bpm"):
            lo, hi = getattr(self, name)
            if not 0 < lo < hi:
                raise ValueError(f"{name} must be (low, high) with 0 < low < high, got {(lo, hi)}")


@dataclass(frozen=True)
class Claims:
    """What a caption says about tempo, key and drums (None: it says nothing)."""

    bpm: float | None = None
    tempo_word: str | None = None  # "slow", "mid" or "fast"
    key: int | None = None  # tonic pitch class, 0 = C
    mode: str | None = None  # "major" or "minor"
    drums: bool | None = None


@dataclass(frozen=True)
class Confident:
    """The measured facts that are sure enough to use (None: not measured or not sure)."""

    tempo_bpm: float | None = None  # sure up to an octave: what a caption is checked against
    key: int | None = None
    mode: str | None = None
    drums: bool | None = None
    tempo_octave_sure: bool = False  # the octave too: `tempo_bpm` may be stated as the beat
    # the pitch-class profile where the key is not sure but the music is tonal (`key_min_in_scale`,
    # and some key fits it at least `key_refute_min_fit`): enough to refute a key claim no key it
    # accepts fits
    pitch_profile: tuple[float, ...] | None = None

    @property
    def stated_bpm(self) -> float | None:
        """The BPM to state as the beat (None when its octave is a guess)."""
        return self.tempo_bpm if self.tempo_octave_sure else None

    @property
    def key_name(self) -> str | None:
        return None if self.key is None else f"{F.KEY_NAMES[self.key]} {self.mode}"


# --- claims -----------------------------------------------------------------------------------

_BPM = re.compile(
    r"(?<![\d.])(\d{2,3}(?:\.\d+)?)\s*(?:-\s*)?(?:bpm|b\.p\.m\.?|beats\s+per\s+minute|beats/min)\b"
    r"|\btempo\s+(?:of|is|at|around|about|~|:)?\s*(?:about|around|roughly|approximately|~)?\s*(\d{2,3}(?:\.\d+)?)\b(?!\s*%)",
    re.IGNORECASE,
)
_TEMPO_WORDS = {
    "slow": r"slow|slowly|downtempo|down-tempo|adagio|largo|lento|grave",
    "mid": r"mid-tempo|midtempo|mid tempo|moderate tempo|medium tempo|medium-tempo|andante|moderato",
    "fast": r"fast|fast-paced|uptempo|up-tempo|quick|rapid|allegro|presto|vivace",
}
_TEMPO_WORD = {w: re.compile(rf"\b(?:{p})\b", re.IGNORECASE) for w, p in _TEMPO_WORDS.items()}
_ACCIDENTAL = r"(#|♯|b|♭|\s*-?\s*sharp|\s*-?\s*flat)?"
# "A minor", "F# major", "Bb maj", "in the key of D", "C#m"; the tonic letter must be upper case
_KEY = re.compile(
    rf"\b([A-G]){_ACCIDENTAL}\s*-?\s*(major|minor|maj|min)\b(?![-\s]key)"
    rf"|\bkey\s+of\s+([A-G]){_ACCIDENTAL}(?:\s*-?\s*(major|minor|maj|min)\b)?"
    rf"|\b([A-G])(#|♯|b|♭)?m\b"
)
_MODE_ONLY = re.compile(r"\b(major|minor)[-\s]key\b|\bin\s+a\s+(major|minor)\s+key\b", re.IGNORECASE)
_NO_DRUMS = re.compile(
    r"\b(?:no|without|lacks?|lacking|absence\s+of|free\s+of|sans|minus)\s+(?:any\s+|a\s+)?"
    r"(?:drums?|percussion|drum\s+kit|beat|rhythm\s+section)\b|\bdrumless\b|\bdrum-free\b|\ba\s+cappella\b",
    re.IGNORECASE,
)
_DRUMS = re.compile(
    r"\b(?:drums?|drumming|drummer|drum\s+machine|drumbeat|percussion|kick(?:\s+drum)?|snares?|hi-?hats?|"
    r"cymbals?|toms?|breakbeats?|tabla|congas?|bongos?|808s?)\b",
    re.IGNORECASE,
)


def _pitch_class(letter: str, accidental: str | None) -> int:
    pc = F.KEY_NAMES.index(letter)
    acc = (accidental or "").strip().lower().lstrip("-").strip()
    if acc in ("#", "♯", "sharp"):
        pc += 1
    elif acc in ("b", "♭", "flat"):
        pc -= 1
    return pc % 12


def _mode(word: str | None) -> str | None:
    if not word:
        return None
    return F.MAJOR if word.lower().startswith("maj") else F.MINOR


def extract_claims(text: str) -> Claims:
    """The tempo, key and drums claims of `text` (the first stated of each; None when absent
    or when the text contradicts itself)."""
    text = text or ""
    bpm = None
    m = _BPM.search(text)
    if m:
        bpm = float(m.group(1) or m.group(2))
    words = [w for w, rx in _TEMPO_WORD.items() if rx.search(text)]
    tempo_word = words[0] if len(words) == 1 else None  # "slow intro, fast chorus": no claim
    key = mode = None
    k = _KEY.search(text)
    if k:
        if k.group(1):
            key, mode = _pitch_class(k.group(1), k.group(2)), _mode(k.group(3))
        elif k.group(4):
            key, mode = _pitch_class(k.group(4), k.group(5)), _mode(k.group(6))
        else:
            key, mode = _pitch_class(k.group(7), k.group(8)), F.MINOR
    else:
        mo = _MODE_ONLY.search(text)
        if mo:
            mode = _mode(mo.group(1) or mo.group(2))
    no_drums, drums_words = bool(_NO_DRUMS.search(text)), bool(_DRUMS.search(_NO_DRUMS.sub(" ", text)))
    drums = None if no_drums and drums_words else False if no_drums else True if drums_words else None
    return Claims(bpm=bpm, tempo_word=tempo_word, key=key, mode=mode, drums=drums)


# --- confident facts ----------------------------------------------------------------------------


def _num(facts: Mapping, name: str) -> float | None:
    v = facts.get(name)
    return None if v is None or v != v else float(v)  # v != v: NaN


def confident_facts(facts: Mapping, cfg: FactCheckConfig = FactCheckConfig()) -> Confident:
    tempo, t_conf = _num(facts, F.TEMPO_BPM), _num(facts, F.TEMPO_CONFIDENCE)
    t_octave = _num(facts, F.TEMPO_OCTAVE_CONFIDENCE)
    key_name, mode, k_conf = facts.get(F.KEY) or "", facts.get(F.MODE) or "", _num(facts, F.KEY_CONFIDENCE)
    ratio, kick = _num(facts, F.PERCUSSIVE_RATIO), _num(facts, F.KICK_RATIO)
    drums = None
    defects = facts.get(F.DEFECTS)
    defects = [] if defects is None else list(defects)  # a list, or an array from a pandas row
    hidden = any(d in cfg.drums_unsure_defects for d in defects)
    absence_hidden = any(d in cfg.drums_absence_unsure_defects for d in defects)
    if not hidden and ratio is not None:
        if ratio >= cfg.drums_present_ratio:
            drums = True
        elif ratio <= cfg.drums_absent_ratio and not absence_hidden and (kick is None or kick <= cfg.kick_absent_ratio):
            drums = False
    profile = facts.get(F.PITCH_CLASS_PROFILE)
    profile = None if profile is None or len(profile) != 12 else tuple(float(x) for x in profile)  # a list, or an array
    named = key_name in F.KEY_NAMES and mode in (F.MAJOR, F.MINOR) and k_conf is not None
    # analyze found the key (the profile's best fit, r = k_conf) from this profile: its scale share says how tonal
    if profile is None:
        tonal = True  # a row measured before the profile existed: as measured
    else:
        tonal = named and FX.scale_share(profile, F.KEY_NAMES.index(key_name), mode) >= cfg.key_min_in_scale
    key_ok = named and k_conf >= cfg.key_min_confidence and tonal
    tempo_sure = bool(tempo) and t_conf is not None and t_conf >= cfg.tempo_min_confidence
    if key_ok or profile is None or not tonal or not k_conf >= cfg.key_refute_min_fit:
        profile = None
    return Confident(
        tempo_bpm=tempo if tempo_sure else None,
        key=F.KEY_NAMES.index(key_name) if key_ok else None,
        mode=mode if key_ok else None,
        drums=drums,
        tempo_octave_sure=tempo_sure and t_octave is not None and t_octave >= cfg.tempo_octave_min_confidence,
        pitch_profile=profile,
    )


_KEYS = [(k, m) for m in (F.MAJOR, F.MINOR) for k in range(12)]


def grounding(facts: Mapping, cfg: FactCheckConfig = FactCheckConfig()) -> dict:
    """The confident facts as plain data for an LLM prompt: {"tempo_bpm": 120, "key": "A minor",
    "drums": "yes"}; a fact that is not confident is left out."""
    c = confident_facts(facts, cfg)
    out: dict = {}
    if c.stated_bpm is not None:
        out["tempo_bpm"] = int(round(c.stated_bpm))
    if c.key_name:
        out["key"] = c.key_name
    if c.drums is not None:
        out["drums"] = "yes" if c.drums else "no"
    return out


# --- the check ------------------------------------------------------------------------------------


def _tempo_agrees(claims: Claims, measured: float, cfg: FactCheckConfig) -> bool:
    octaves = (measured / 2, measured, measured * 2) if cfg.half_double else (measured,)
    tol = cfg.tempo_tolerance
    if claims.bpm is not None:
        return any(abs(claims.bpm - t) <= tol * t for t in octaves)
    lo, hi = {"slow": cfg.slow_bpm, "mid": cfg.mid_bpm, "fast": cfg.fast_bpm}[claims.tempo_word]
    return any(lo * (1 - tol) <= t <= hi * (1 + tol) for t in octaves)


def _relative(key: int, mode: str) -> tuple[int, str]:
    return ((key + 9) % 12, F.MINOR) if mode == F.MAJOR else ((key + 3) % 12, F.MAJOR)


def _key_agrees(claims: Claims, c: Confident, cfg: FactCheckConfig) -> bool:
    """Whether a stated key and/or mode agrees with the measured key, within the confusions the
    config accepts (relative major/minor, keys a fifth apart)."""
    tonics = [c.key] + ([(c.key + 7) % 12, (c.key + 5) % 12] if cfg.fifth_keys else [])
    accepted = {(k, c.mode) for k in tonics}
    if cfg.relative_key:
        accepted |= {_relative(k, c.mode) for k in tonics}
    if claims.key is None:  # a mode alone
        return any(m == claims.mode for _, m in accepted)
    if claims.mode is None:
        return any(k == claims.key for k, _ in accepted)
    return (claims.key, claims.mode) in accepted


def _key_refuted(claims: Claims, profile: Sequence[float], cfg: FactCheckConfig) -> bool:
    """Whether no key that would agree with the claimed one, were it measured (the accepted
    confusions included), fits the pitch-class profile at `key_refute_max_r` or more."""
    fits = [r for k, m in _KEYS
            if _key_agrees(claims, Confident(key=k, mode=m), cfg) and (r := FX.key_correlation(profile, k, m)) == r]
    return bool(fits) and max(fits) < cfg.key_refute_max_r


def check(text: str | Claims, facts: Mapping | Confident, cfg: FactCheckConfig = FactCheckConfig()) -> list[str]:
    """Why `text` contradicts the confident facts (reasons in `schemas.facts.CHECK_REASONS`
    order); [] when it does not, or when it claims nothing that was measured confidently."""
    claims = text if isinstance(text, Claims) else extract_claims(text)
    c = facts if isinstance(facts, Confident) else confident_facts(facts, cfg)
    reasons = []
    if c.tempo_bpm is not None and (claims.bpm is not None or claims.tempo_word is not None):
        if not _tempo_agrees(claims, c.tempo_bpm, cfg):
            reasons.append(F.CONTRADICTS_TEMPO)
    if c.key is not None and (claims.key is not None or claims.mode is not None):
        if not _key_agrees(claims, c, cfg):
            reasons.append(F.CONTRADICTS_KEY)
    elif c.pitch_profile is not None and claims.key is not None and _key_refuted(claims, c.pitch_profile, cfg):
        reasons.append(F.CONTRADICTS_KEY)
    if c.drums is not None and claims.drums is not None and claims.drums != c.drums:
        reasons.append(F.CONTRADICTS_DRUMS)
    return reasons


# --- captions from facts ------------------------------------------------------------------------------


def _tempo_word(bpm: float, cfg: FactCheckConfig) -> str:
    if bpm < cfg.mid_bpm[0]:
        return "slow"
    return "fast" if bpm > cfg.mid_bpm[1] else "mid-tempo"


def facts_sentence(facts: Mapping, cfg: FactCheckConfig = FactCheckConfig()) -> str:
    """A short sentence of the confident facts, MusicBench-style; "" when none is confident."""
    c = confident_facts(facts, cfg)
    parts = []
    if c.stated_bpm is not None:
        parts.append(f"The bpm is {int(round(c.stated_bpm))}.")
    if c.key_name:
        parts.append(f"The key is {c.key_name}.")
    if c.drums is not None:
        parts.append("It has drums." if c.drums else "It has no drums.")
    return " ".join(parts)


def fallback_caption(facts: Mapping, cfg: FactCheckConfig = FactCheckConfig(), tags: Sequence[str] = ()) -> str:
    """A caption made of the confident facts (and the tags, if any), for a clip whose caption
    is missing and whose LLM candidates all failed; "" when there is nothing to say."""
    c = confident_facts(facts, cfg)
    tags = [t.strip() for t in tags if t and t.strip() and not check(t, c, cfg)]  # no tag that contradicts
    bpm = c.stated_bpm
    if bpm is None and c.key is None and c.drums is None and not tags:
        return ""
    text = "A"
    if bpm is not None:
        text += f" {_tempo_word(bpm, cfg)}"
    text += " piece of music"
    if bpm is not None:
        text += f" at about {int(round(bpm))} bpm"
    if c.key_name:
        text += f" in {c.key_name}"
    if c.drums is not None:
        text += ", with drums" if c.drums else ", without drums"
    if tags:
        text += f"; tagged {', '.join(tags[:8])}"
    return text + "."
