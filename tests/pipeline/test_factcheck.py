"""Caption claims, the check against measured facts, and captions written from facts."""

from __future__ import annotations

import pytest

from pipeline import factcheck as FC
from schemas import facts as F

# A minor at 120 bpm, no drums, every fact confident
FACTS = {F.TEMPO_BPM: 120.0, F.TEMPO_CONFIDENCE: 0.8, F.TEMPO_OCTAVE_CONFIDENCE: 0.9, F.KEY: "A", F.MODE: F.MINOR,
         F.KEY_CONFIDENCE: 0.8, F.PERCUSSIVE_RATIO: 0.0, F.KICK_RATIO: 0.0}


@pytest.mark.parametrize("text, expected", [
    ("A mid-tempo saw lead melody in A# minor at 120 bpm over warm pad chords, no drums.",
     FC.Claims(bpm=120.0, tempo_word="mid", key=10, mode=F.MINOR, drums=False)),
    ("A fast guitar tune in Bb major at 140 BPM, with a simple kick and hi-hat beat.",
     FC.Claims(bpm=140.0, tempo_word="fast", key=10, mode=F.MAJOR, drums=True)),
    ("slow ballad in the key of F#", FC.Claims(tempo_word="slow", key=6)),
    ("tempo of 96, chords Em and C", FC.Claims(bpm=96.0, key=4, mode=F.MINOR)),
    ("A minor-key tune with drums", FC.Claims(mode=F.MINOR, drums=True)),  # "A" is an article here
    ("no percussion, just a piano", FC.Claims(drums=False)),
    ("A minimal techno track", FC.Claims()),
    ("slow intro, then a fast chorus", FC.Claims()),  # two tempo words: no claim
    ("no drums at first, then a snare", FC.Claims()),  # says both: no claim
    ("", FC.Claims()),
])
def test_extract_claims(text, expected):
    assert FC.extract_claims(text) == expected


def test_a_truthful_caption_passes_and_one_with_nothing_checkable_too():
    assert FC.check("A slow melody in A minor at 120 bpm, no drums.", FACTS) == []  # slow fits 60 = 120 / 2
    assert FC.check("a dreamy ambient texture", FACTS) == []


@pytest.mark.parametrize("text, reasons", [
    ("at 90 bpm", [F.CONTRADICTS_TEMPO]),
    ("at 60 bpm", []),  # half time
    ("at 236 bpm", []),  # double time, within the tolerance
    ("at 150 bpm in F# minor with drums", [F.CONTRADICTS_TEMPO, F.CONTRADICTS_KEY, F.CONTRADICTS_DRUMS]),
    ("in E minor", []),  # a fifth above: the key finder's common confusion, accepted by default
    ("in F major", []),  # the relative major of the key a fifth below
    ("in C major", []),  # the relative major
    ("in A major", [F.CONTRADICTS_KEY]),  # the parallel major
    ("in the key of C", []),
    ("in the key of D", []),  # a fifth below
    ("in the key of B", [F.CONTRADICTS_KEY]),
    ("a major-key song", []),  # a mode alone: the relative major may be meant
    ("a fast drum and bass track", [F.CONTRADICTS_DRUMS]),  # 120 or 240 both fit "fast"
])
def test_check_reasons(text, reasons):
    assert FC.check(text, FACTS) == reasons


def test_relative_keys_can_count_as_different():
    strict = FC.FactCheckConfig(relative_key=False)
    assert FC.check("in C major", FACTS, strict) == [F.CONTRADICTS_KEY]
    assert FC.check("a major-key song", FACTS, strict) == [F.CONTRADICTS_KEY]
    assert FC.check("at 60 bpm", FACTS, FC.FactCheckConfig(half_double=False)) == [F.CONTRADICTS_TEMPO]
    no_fifths = FC.FactCheckConfig(fifth_keys=False)
    assert FC.check("in E minor", FACTS, no_fifths) == [F.CONTRADICTS_KEY]
    assert FC.check("in C major", FACTS, no_fifths) == []  # still the relative major


def test_facts_that_are_not_confident_are_not_checked():
    unsure = {**FACTS, F.TEMPO_CONFIDENCE: 0.1, F.KEY_CONFIDENCE: 0.2, F.PERCUSSIVE_RATIO: 0.001}
    assert FC.check("at 150 bpm in E minor with drums", unsure) == []
    assert FC.check("at 150 bpm in E minor with drums", {}) == []  # a row with no facts at all
    assert FC.confident_facts(unsure) == FC.Confident()
    assert FC.grounding(unsure) == {}
    assert FC.check("with drums", {F.PERCUSSIVE_RATIO: 0.4}) == []


def _c_major_ish_profile() -> list[float]:
    """The pitch classes of music between C major and A minor with chromatic passing notes:
    tonal (66 % on the scale's notes; its best key fits at r = 0.625), but no key is sure."""
    p = [0.6] * 12
    for pc in (0, 2, 4, 5, 7, 9, 11):
        p[pc] = 1.0
    p[1] += 0.3
    p[8] += 0.3
    return [x / sum(p) for x in p]


def test_a_key_the_notes_refute_is_caught_though_no_key_is_sure():
    facts = {**FACTS, F.KEY: "A", F.MODE: F.MINOR, F.KEY_CONFIDENCE: 0.625, F.PITCH_CLASS_PROFILE: _c_major_ish_profile()}
    c = FC.confident_facts(facts)
    assert c.key is None and c.pitch_profile is not None  # not sure enough to state or to compare
    assert FC.grounding(facts).get("key") is None
    assert FC.check("a song in F# major", facts) == [F.CONTRADICTS_KEY]  # a tritone from C: its notes are not there
    assert FC.check("in Eb minor", facts) == [F.CONTRADICTS_KEY]
    for truthful in ("in C major", "in A minor", "in G major", "in E minor", "in D minor", "key of C", "a minor-key tune"):
        assert FC.check(truthful, facts) == [], truthful
    assert FC.check("a song in F# major", facts, FC.FactCheckConfig(key_refute_max_r=-1.0)) == []  # the refutation off
    # only where some key fits the notes (noise and drum loops: test_facts.py)
    stricter = FC.FactCheckConfig(key_refute_min_fit=0.65)
    assert FC.confident_facts(facts, stricter).pitch_profile is None and FC.check("in F# major", facts, stricter) == []
    # where the key is sure, the measured key decides, as before
    assert FC.confident_facts({**facts, F.KEY_CONFIDENCE: 0.8}).pitch_profile is None


def test_a_key_is_sure_only_in_tonal_music():
    """A correlation is blind to how far from flat the profile is: a nearly flat one (noise)
    shaped like a key profile correlates at 1 but holds 7/12 of its energy on the scale."""
    flat_ish = [1 + 0.01 * w for w in (6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88)]
    facts = {**FACTS, F.KEY: "C", F.MODE: F.MAJOR, F.KEY_CONFIDENCE: 1.0, F.PITCH_CLASS_PROFILE: flat_ish}
    c = FC.confident_facts(facts)
    assert c.key is None and c.pitch_profile is None
    assert FC.check("in F# major", facts) == [] and FC.grounding(facts).get("key") is None
    assert FC.confident_facts(facts, FC.FactCheckConfig(key_min_in_scale=7 / 12)).key == 0  # the gate off
    assert FC.confident_facts({k: v for k, v in facts.items() if k != F.PITCH_CLASS_PROFILE}).key == 0  # no profile: as measured


def test_drums_are_unsure_on_a_clip_whose_defects_hide_or_fake_transients():
    drums = {F.PERCUSSIVE_RATIO: 0.05, F.DEFECTS: []}
    assert FC.confident_facts(drums).drums is True
    assert FC.confident_facts({**drums, F.DEFECTS: [F.NOISY]}).drums is None  # hiss buries a quiet kit
    assert FC.confident_facts({**drums, F.DEFECTS: [F.CLIPPING]}).drums is None  # clipped attacks are broadband
    assert FC.confident_facts({**drums, F.DEFECTS: [F.BAND_LIMITED]}).drums is True  # measured within the bandwidth
    assert FC.confident_facts({F.PERCUSSIVE_RATIO: 0.0, F.DEFECTS: [F.BAND_LIMITED]}).drums is None  # a dull snare
    assert FC.check("no drums", {**drums, F.DEFECTS: [F.NOISY]}) == []
    assert FC.confident_facts({F.PERCUSSIVE_RATIO: 0.0, F.DEFECTS: None}).drums is False


def test_sentence_grounding_and_fallback_caption_agree_with_the_facts():
    assert FC.facts_sentence(FACTS) == "The bpm is 120. The key is A minor. It has no drums."
    assert FC.grounding(FACTS) == {"tempo_bpm": 120, "key": "A minor", "drums": "no"}
    caption = FC.fallback_caption(FACTS, tags=["lofi", "drums", "  "])
    assert caption == "A mid-tempo piece of music at about 120 bpm in A minor, without drums; tagged lofi."
    assert FC.check(caption, FACTS) == []  # a tag that contradicts the facts is left out
    for bpm in (50.0, 90.0, 170.0):
        facts = {**FACTS, F.TEMPO_BPM: bpm}
        assert FC.check(FC.fallback_caption(facts), facts) == []


def test_a_bpm_whose_octave_is_a_guess_is_checked_but_never_stated():
    """Sure of the pulse but not of the octave (the beat may be 60 or 120): a caption's 60 or 120
    BPM agrees, but mosaiq states no BPM and no slow/fast word, so it never writes half time."""
    guess = {**FACTS, F.TEMPO_OCTAVE_CONFIDENCE: 0.55}
    c = FC.confident_facts(guess)
    assert c.tempo_bpm == 120.0 and c.stated_bpm is None
    assert FC.check("a slow song at 60 bpm", guess) == [] and FC.check("at 90 bpm", guess) == [F.CONTRADICTS_TEMPO]
    assert FC.facts_sentence(guess) == "The key is A minor. It has no drums."
    assert "tempo_bpm" not in FC.grounding(guess)
    assert FC.fallback_caption(guess) == "A piece of music in A minor, without drums."
    assert FC.confident_facts({**FACTS, F.TEMPO_OCTAVE_CONFIDENCE: None}).stated_bpm is None  # not measured: not stated
    assert FC.confident_facts(guess, FC.FactCheckConfig(tempo_octave_min_confidence=0.5)).stated_bpm == 120.0


def test_low_transients_keep_no_drums_unsure_and_never_make_drums_sure():
    """A kick alone or a loud plucked bass: their low transients look alike, so neither is a
    sure 'no drums' nor a sure 'drums'."""
    assert FC.confident_facts({F.PERCUSSIVE_RATIO: 0.0, F.KICK_RATIO: 0.03}).drums is None
    assert FC.confident_facts({F.PERCUSSIVE_RATIO: 0.0, F.KICK_RATIO: 0.005}).drums is None
    assert FC.confident_facts({F.PERCUSSIVE_RATIO: 0.0, F.KICK_RATIO: 0.001}).drums is False
    assert FC.confident_facts({F.PERCUSSIVE_RATIO: 0.01, F.KICK_RATIO: 0.0}).drums is True
    assert FC.check("no drums, just an 808 pattern", {F.PERCUSSIVE_RATIO: 0.0, F.KICK_RATIO: 0.03}) == []


def test_fallback_caption_is_empty_when_there_is_nothing_to_say():
    assert FC.fallback_caption({}) == ""
    assert FC.facts_sentence({}) == ""
    assert FC.fallback_caption({}, tags=["jazz"]) == "A piece of music; tagged jazz."


def test_config_is_checked():
    with pytest.raises(ValueError, match="drums"):
        FC.FactCheckConfig(drums_absent_ratio=0.3, drums_present_ratio=0.2)
    with pytest.raises(ValueError, match="kick_absent_ratio"):
        FC.FactCheckConfig(kick_absent_ratio=-0.1)
    with pytest.raises(ValueError, match="tempo_octave_min_confidence"):
        FC.FactCheckConfig(tempo_octave_min_confidence=1.5)
    with pytest.raises(ValueError, match="key_min_in_scale.*0.5"):
        FC.FactCheckConfig(key_min_in_scale=0.5)
    with pytest.raises(ValueError, match="key_refute_max_r.*0.6, 0.5"):
        FC.FactCheckConfig(key_refute_max_r=0.6, key_refute_min_fit=0.5)
    with pytest.raises(ValueError, match="slow_bpm"):
        FC.FactCheckConfig(slow_bpm=(100.0, 50.0))
