"""Measured facts of one clip: pure functions over a numpy waveform at its native rate and channels.

`measure(audio, sr)` returns a dict keyed by the column names of `schemas.facts` (units in the
names); `find_defects(facts, thresholds)` names what is technically wrong. No model weights:
signal processing only (numpy/scipy, librosa for the musical facts, pyloudnorm for BS.1770).

Technical facts are measured at the native rate (a lowpass or an encoder's cutoff is only
visible there); musical facts on a mono copy at `ANALYSIS_SR`.

How each fact is found (docs/facts.md has the reasoning and the limits):
- loudness: ITU-R BS.1770-4 integrated loudness (K-weighting, 400 ms blocks, absolute and
  relative gates), all channels, LUFS.
- true peak: the largest sample of a 4x polyphase-oversampled copy, dBTP.
- clipped fraction: samples in runs of >= 3 consecutive samples at the clip's own positive or
  negative peak level (clipping followed by a gain change leaves flat tops below 0 dBFS).
- bandwidth: the long-term spectrum in linear bands; a cliff is a drop of `cliff_drop_db`
  within `cliff_span_octaves` after which nine bands in ten stay under `cliff_floor_db` (near
  the 16-bit quantization floor: almost nothing), or a drop of `cliff_steep_db` over mostly digital
  silence (a filter's stop band that still lets a few loud partials through). A recording's
  noise floor is well above that floor, so a soft instrument with little treble over its noise
  floor has no cliff. No cliff: Nyquist.
- noise floor and SNR: minimum statistics; per frequency bin a low percentile of the frame
  powers (bias-corrected for an exponential distribution), then a running median across
  frequency so that sustained partials do not count as noise; the noise is that floor's mean
  in dB over the clip's band, as a white noise filling the band (the low bins of a dense mix,
  which never go quiet, count by their share of the spectrum, not by their power).
- tempo: SuperFlux onset envelope (vibrato-proof); its autocorrelation gives a metrical grid
  under a broad log-normal prior; the beat is chosen among the grid's octaves and 3:2
  relatives by periodicity, a tighter prior, the harmonic rhythm (chroma novelty: a chord most
  often lasts 4 beats) and the onset density. Confidence: right up to an octave (the caption
  check accepts half and double time).
- key and mode: harmonic part (HPSS), CQT chroma (tuning estimated), mean over frames,
  correlated with the 24 rotations of the Krumhansl-Kessler profiles; confidence is the best
  correlation. The mean chroma is kept too (the pitch-class profile), so a key claimed in a
  caption can be tested against the notes even when no key is sure.
- percussive ratio: the energy share of broadband percussive transients (HPSS percussive part,
  frames over 4x its median and spectrally flat between 200 Hz and 10 kHz or the bandwidth):
  snares, hats, claps; not the attacks of pitched notes, not steady noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from schemas import facts as F
from schemas import tables as T

ANALYSIS_SR = 22_050  # rate of the mono copy the musical facts are measured on
_EPS = 1e-20  # power floor (-200 dB) for logarithms
_CLIPPED_FRACTION = 1e-4  # the default clipped fraction of the `clipping` defect, and of the tempo's backbeat
_QUANT_16BIT = (2.0 / 2**16) ** 2 / 12  # 16-bit PCM's quantization noise: -101.1 dB re full-scale white noise density


@dataclass(frozen=True)
class MeasureConfig:
    """How the facts are measured (not thresholds for defects: see `DefectThresholds`)."""

    silence_dbfs: float = T.SILENCE_DBFS  # a 50 ms frame whose RMS is under this is silent
    clip_run: int = 3  # consecutive samples at the peak level that make a clipped run
    cliff_drop_db: float = 30.0  # a band-limit cliff falls at least this much ...
    cliff_span_octaves: float = 1.0  # ... within this span ...
    cliff_floor_db: float = -90.0  # ... to under this level, dB re full-scale white noise density
    cliff_steep_db: float = 40.0  # ... or at least this much, with mostly digital silence above (a filter's stop band)
    noise_percentile: float = 10.0  # per-bin percentile of frame powers taken as the noise floor
    tempo_min_bpm: float = 40.0
    tempo_max_bpm: float = 240.0
    tempo_prior_bpm: float = 120.0  # centre of the log-normal tempo prior (librosa's default)
    tempo_prior_octaves: float = 1.0  # its standard deviation, octaves, when finding the metrical grid
    tempo_beat_prior_octaves: float = 0.7  # ... and when choosing the beat among the grid's octaves
    # the exponent of the periodicity there: it favours the slower of two octaves wherever the
    # bar repeats (every beat level of a regular meter is periodic, the half bar the most), so
    # it counts for less than the cues that name the beat
    tempo_periodicity_weight: float = 0.5
    # the backbeat (a kick, then a snare one beat later) names the beat among octaves in music
    # with drums, from this percussive ratio up (where drums are sure, as in the caption
    # check); without a kit, a bass under a band's accents would pass for one and name the
    # half bar, so below it the backbeat counts for nothing
    tempo_backbeat_ratio: float = F.DRUMS_SURE_RATIO
    tempo_backbeat_weight: float = 3.0  # the exponent of the kick-to-snare correlation
    # ... and not in a clipped clip (more than this share of samples in flat tops, the
    # `clipping` defect's default): clipped attacks are broadband bursts that pass for a kit
    tempo_backbeat_max_clipped: float = _CLIPPED_FRACTION

    def __post_init__(self):
        if not 0 < self.noise_percentile < 50:
            raise ValueError(f"noise_percentile must be in (0, 50), got {self.noise_percentile}")
        if not 0 <= self.tempo_periodicity_weight <= 1:
            raise ValueError(f"tempo_periodicity_weight must be in [0, 1], got {self.tempo_periodicity_weight}")
        if not 0 <= self.tempo_backbeat_max_clipped <= 1:
            raise ValueError(f"tempo_backbeat_max_clipped must be in [0, 1], got {self.tempo_backbeat_max_clipped}")
        if not self.tempo_backbeat_ratio > 0 or self.tempo_backbeat_weight < 0:
            raise ValueError(f"need tempo_backbeat_ratio > 0 and tempo_backbeat_weight >= 0, got "
                             f"{self.tempo_backbeat_ratio}, {self.tempo_backbeat_weight}")
        if not 0 < self.tempo_min_bpm < self.tempo_max_bpm:
            raise ValueError(f"need 0 < tempo_min_bpm < tempo_max_bpm, got {self.tempo_min_bpm}, {self.tempo_max_bpm}")
        if self.clip_run < 2:
            raise ValueError(f"clip_run must be >= 2, got {self.clip_run}")


@dataclass(frozen=True)
class DefectThresholds:
    """When a technical fact becomes a defect flag (see docs/facts.md for the reasoning)."""

    clipped_fraction: float = _CLIPPED_FRACTION  # clipping: more than 0.01 % of samples in flat-top runs (a few runs a second)
    band_limited_ratio: float = 0.85  # band_limited: a cliff under 85 % of Nyquist (CD anti-alias filters sit at ~0.9) ...
    band_limited_hz: float = 20_000.0  # ... and under 20 kHz: a 96 kHz file cut at 22 kHz (a CD master) lacks nothing heard
    noisy_snr_db: float = 15.0  # noisy: estimated SNR under 15 dB
    too_quiet_lufs: float = -40.0  # too_quiet: integrated loudness under -40 LUFS
    dc_offset: float = 0.01  # dc_offset: a channel mean beyond 1 % of full scale (-40 dBFS)
    silent_fraction: float = 0.5  # silent_parts: more than half of the 50 ms frames silent
    out_of_phase_correlation: float = -0.3  # out_of_phase: stereo correlation under -0.3 (one channel's polarity flipped)


# --- helpers --------------------------------------------------------------------------------


def _db(power: float | np.ndarray) -> float | np.ndarray:
    return 10.0 * np.log10(np.maximum(power, _EPS))


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _as_channels(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"audio must be (T,) or (C, T) with T > 0, got shape {np.shape(audio)}")
    return a  # (C, T)


def _n_fft(sr: int) -> int:
    """A ~93 ms analysis window: 2048 at 22.05 kHz, 4096 at 44.1/48 kHz."""
    return int(2 ** round(math.log2(0.0929 * sr)))


# --- technical facts ------------------------------------------------------------------------


def loudness_lufs(a: np.ndarray, sr: int) -> float | None:
    """BS.1770-4 integrated loudness of (C, T) audio; None when shorter than one 400 ms block."""
    import pyloudnorm

    if a.shape[1] < int(0.4 * sr) + 1:
        return None
    meter = pyloudnorm.Meter(sr)  # K-weighting designed for this rate
    # pyloudnorm weighs channels 1, 1, 1, 1.41, 1.41 (L, R, C, Ls, Rs); a 5.1 file (or 7.1) in the
    # WAVE/FFmpeg order L R C LFE Ls Rs ... leaves out its LFE (BS.1770) and its back pair
    keep = [0, 1, 2, 4, 5] if a.shape[0] >= 6 else list(range(a.shape[0]))
    x = a[keep].T.astype(np.float64)  # (T, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _finite(meter.integrated_loudness(x))


def true_peak_dbtp(a: np.ndarray) -> float | None:
    up = signal.resample_poly(a.astype(np.float64), 4, 1, axis=1)  # (C, 4T)
    peak = max(float(np.abs(up).max()), float(np.abs(a).max()))
    return _finite(20 * math.log10(peak)) if peak > 0 else None


def _samples_in_runs(mask: np.ndarray, min_run: int) -> int:
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return int(lengths[lengths >= min_run].sum())


def clipped_fraction(a: np.ndarray, min_run: int = 3) -> float:
    """Share of samples in runs of >= `min_run` at the channel's positive or negative peak.

    Only samples equal to the peak count (to float32 precision): clipped PCM holds the same
    integer, so a flat top is exact, while the crest of a low note changes from sample to
    sample. (A pure sine under ~40 Hz quantized to 16 bits can still hold one value for three
    samples at its crest; music with such a bass reads a little clipped.)
    """
    clipped = 0
    for ch in a:
        hi, lo = float(ch.max()), float(ch.min())
        mask = np.zeros(ch.shape, bool)
        if hi > 0:
            mask |= ch >= hi * (1 - 1e-7)
        if lo < 0:
            mask |= ch <= lo * (1 - 1e-7)
        clipped += _samples_in_runs(mask, min_run)
    return clipped / a.size


def _power_spectrogram(x: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies (K,), power (K, N)) of mono `x`, normalized so that white noise of power
    P reads P in every bin (dB re full-scale white noise density)."""
    n_fft = _n_fft(sr)
    hop = n_fft // 4
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    win = signal.get_window("hann", n_fft).astype(np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), n_fft)[::hop]  # (N, n_fft)
    spec = np.fft.rfft(frames * win, axis=1)  # (N, K)
    power = (spec.real**2 + spec.imag**2) / np.sum(win**2)  # (N, K)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    return freqs, power.T  # (K,), (K, N)


_AUDIBLE_TOP_HZ = 22_050.0  # the top of a CD's band: the stop band of a cut is judged up to here at least


def bandwidth(freqs: np.ndarray, mean_power: np.ndarray, sr: int, cfg: MeasureConfig) -> float:
    """Effective bandwidth in Hz: the edge of a spectral cliff, or Nyquist when there is none."""
    nyq = sr / 2.0
    n_bands = min(256, len(freqs) - 1)
    edges = np.linspace(0, len(freqs) - 1, n_bands + 1).astype(int)
    power_b = np.array([mean_power[edges[i]:max(edges[i + 1], edges[i] + 1)].mean() for i in range(n_bands)])
    level = _db(power_b)
    centre = np.array([freqs[edges[i]:max(edges[i + 1], edges[i] + 1)].mean() for i in range(n_bands)])
    level_s = ndimage.median_filter(level, size=3, mode="nearest")  # one-band spurs do not count
    half = 2 ** (cfg.cliff_span_octaves / 2)
    for i in range(n_bands):
        f = centre[i]
        if f < 100.0 or f > 0.98 * nyq:
            continue
        below = level[(centre > f / half) & (centre <= f)]
        j = np.searchsorted(centre, f * half)
        if j >= n_bands or below.size == 0:
            break
        # the stop band: up to 22.05 kHz or two octaves on, whichever is higher (a few stray partials
        # aside); a 96 or 192 kHz file's empty ultrasound beyond would hide the music under it
        above = level_s[j:max(j + 1, int(np.searchsorted(centre, max(f * half * 4, _AUDIBLE_TOP_HZ), side="right")))]
        top, rest = float(np.median(below)), float(np.percentile(above, 90))
        # a filter's stop band: a steep drop, and under the partials it lets through, another half
        # span up, digital silence (a recording's hiss would still be there)
        k = np.searchsorted(centre, f * half * half)
        steep = top - rest >= cfg.cliff_steep_db and k < n_bands and float(np.median(level[k:])) <= cfg.cliff_floor_db
        if (rest <= cfg.cliff_floor_db and top - rest >= cfg.cliff_drop_db) or steep:
            return _edge(centre, power_b, j)
    return nyq


def _edge(centre: np.ndarray, power_b: np.ndarray, top: int) -> float:
    """The cliff's edge: the highest band, contiguous with band `top` (where the cliff was
    found), whose third-octave level is within 30 dB of the loudest third-octave level of the
    two octaves below it. From `top` it walks up while bands pass (the cliff test tolerates a
    tenth of the bands above as stray partials, so it may fire up to a tenth below the edge)
    and down while they fail."""
    csum = np.concatenate([[0.0], np.cumsum(power_b)])

    def levels(octaves: float) -> np.ndarray:  # each band's level over `octaves` around it, dB
        lo = np.searchsorted(centre, centre * 2 ** (-octaves / 2))
        hi = np.searchsorted(centre, centre * 2 ** (octaves / 2), side="right")
        return _db((csum[hi] - csum[lo]) / np.maximum(hi - lo, 1))

    smooth, own = levels(1 / 3), levels(1 / 6)  # the music below; the band's own level, little spread

    def passes(e: int) -> bool:
        return bool(own[e] >= smooth[(centre >= centre[e] / 4) & (centre <= centre[e])].max() - 30.0)

    if passes(top):  # up across gaps between partials narrower than a sixth of an octave
        e = top
        while True:
            ahead = [k for k in range(e + 1, int(np.searchsorted(centre, centre[e] * 2 ** (1 / 6), side="right"))) if passes(k)]
            if not ahead:
                return float(centre[e])
            e = ahead[-1]
    for e in range(top - 1, -1, -1):
        if passes(e):
            return float(centre[e])
    return float(centre[top])


def noise_floor(power: np.ndarray, percentile: float, freqs: np.ndarray, bandwidth_hz: float) -> float:
    """Power of the stationary noise, (K, N) `power` and its (K,) `freqs`: per bin a low
    percentile of the frame powers, divided by that percentile of an exponential distribution
    (a noise bin's power), a running median over 31 bins so sustained partials are not taken
    for noise; then the mean in dB (geometric mean) of that floor over the bins under
    `bandwidth_hz`, each held at least at 16-bit quantization noise, times the share of the
    spectrum they cover: the power of a white noise filling the clip's band at that level.

    The mean in dB, not in power: a dense mix never goes quiet in its low and mid bins, so
    their low percentile is the music itself, tens of dB over the floor of the treble; a mean
    in power would be that music, while in dB each bin counts by its share of the spectrum,
    where hiss is heard. White noise reads its own power (the SNR is the true one within
    ~1 dB), also under an encoder's lowpass; a noise falling with frequency reads low (pink
    noise by ~6 dB), and hum or rumble under the bass is not seen."""
    q = np.percentile(power, percentile, axis=1) / -math.log(1 - percentile / 100.0)  # (K,)
    log_q = np.log(np.maximum(q, _QUANT_16BIT))  # (K,); digital silence counts as 16-bit noise
    smooth = ndimage.median_filter(log_q, size=31, mode="nearest")  # (K,)
    top = max(2, int(np.searchsorted(freqs, bandwidth_hz, side="right")))  # bins 1..top-1: the band, DC left out
    return float(np.exp(smooth[1:top].mean()) * (top - 1) / (len(freqs) - 1))


def silence_fraction(a: np.ndarray, sr: int, silence_dbfs: float) -> float:
    x = a.mean(axis=0)
    x = x - x.mean()
    n = max(1, int(0.05 * sr))
    frames = x[: len(x) // n * n].reshape(-1, n) if len(x) >= n else x[None, :]
    rms_db = _db(np.mean(frames.astype(np.float64) ** 2, axis=1))
    return float(np.mean(rms_db < silence_dbfs))


def stereo_correlation(a: np.ndarray) -> float | None:
    if a.shape[0] < 2:
        return None
    l, r = a[0].astype(np.float64), a[1].astype(np.float64)
    l, r = l - l.mean(), r - r.mean()
    den = math.sqrt(float(np.dot(l, l)) * float(np.dot(r, r)))
    return float(np.dot(l, r) / den) if den > 0 else None


def spectral_centroid(freqs: np.ndarray, power: np.ndarray) -> float | None:
    mag = np.sqrt(power)  # (K, N)
    total = mag.sum(axis=0)
    energy = power.sum(axis=0)
    ok = total > 0
    if not ok.any():
        return None
    cent = (freqs[:, None] * mag[:, ok]).sum(axis=0) / total[ok]
    return float(np.average(cent, weights=energy[ok]))


# --- musical facts ---------------------------------------------------------------------------

# Krumhansl & Kessler (1982) probe-tone profiles, tonic first
_KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
_KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def key_correlation(profile: np.ndarray, tonic: int, mode: str) -> float:
    """Pearson correlation of a 12-bin pitch-class profile (C first) with the Krumhansl-Kessler
    profile of the key `tonic` (0 = C) `mode`; NaN when the profile is flat."""
    kk = _KK_MAJOR if mode == F.MAJOR else _KK_MINOR
    p = np.asarray(profile, dtype=np.float64)
    if not np.ptp(p) > 0:
        return float("nan")
    return float(np.corrcoef(p, np.roll(kk, tonic))[0, 1])


_MAJOR_SCALE = np.array([0, 2, 4, 5, 7, 9, 11])


def scale_share(profile: np.ndarray, tonic: int, mode: str) -> float:
    """The share of a pitch-class profile (C first) on the seven notes of the key's scale (a
    minor key: its natural minor, its relative major's notes); 7/12 for a flat profile."""
    p = np.clip(np.asarray(profile, dtype=np.float64), 0.0, None)
    root = tonic if mode == F.MAJOR else (tonic + 3) % 12
    return float(p[(_MAJOR_SCALE + root) % 12].sum() / p.sum()) if p.sum() > 0 else 7 / 12


def key_from_chroma(chroma: np.ndarray) -> tuple[int, str, float]:
    """(tonic pitch class, mode, correlation) of the best of the 24 key profiles for a
    12-bin pitch-class profile (C first)."""
    best = (0, F.MAJOR, -2.0)
    for mode in (F.MAJOR, F.MINOR):
        for tonic in range(12):
            r = key_correlation(chroma, tonic, mode)
            if np.isfinite(r) and r > best[2]:
                best = (tonic, mode, r)
    return best


def _transient_frames(perc_band: np.ndarray) -> np.ndarray:
    """Frames where a band's percussive power (B, N) rises over 4 times its median over the
    clip: a hit, not a stationary sound."""
    e = perc_band.sum(axis=0)  # (N,)
    return e > 4.0 * np.median(e) + _EPS


def drum_transient_share(perc: np.ndarray, power: np.ndarray, freqs: np.ndarray,
                         top_hz: float = 10_000.0) -> float | None:
    """Share of the clip's energy in noise-like percussive transients (a snare, hats, cymbals, a
    clap, a shaker): frames whose percussive power (HPSS, margin 2) from 1 kHz up is a transient
    (`_transient_frames`) and spread evenly over that band (spectral flatness over 0.25, about
    half a white noise's), not the comb of partials a pitched note's attack leaves. The band
    stops at `top_hz` (10 kHz, or 90 % of the clip's bandwidth, so a lowpass does not make a
    snare look pitched); None when under 2 kHz is left. (K, N) powers."""
    total = float(power.sum())
    top = min(10_000.0, top_hz)
    if total <= 0 or top < 2_000.0:
        return None
    band = (freqs >= 1_000.0) & (freqs <= top)
    p = perc[band]  # (B, N)
    flat = np.exp(np.mean(np.log(p + _EPS), axis=0)) / np.maximum(np.mean(p, axis=0), _EPS)  # (N,)
    hits = _transient_frames(p) & (flat > 0.25)
    return float(perc[:, hits].sum() / total)


def kick_transient_share(perc: np.ndarray, power: np.ndarray, freqs: np.ndarray) -> float | None:
    """Share of the clip's energy in low percussive transients: the HPSS percussive part under
    150 Hz in its transient frames (`_transient_frames`), summed over that band. A kick drum
    (an 808's too, which has no noise to count in `drum_transient_share`) and low toms; the
    attacks of a plucked bass add a little. None for a silent clip. (K, N) powers."""
    total = float(power.sum())
    if total <= 0:
        return None
    low = perc[freqs < 150.0]  # (B, N)
    return float(low[:, _transient_frames(low)].sum() / total)


def chroma_novelty(chroma: np.ndarray, half: int) -> np.ndarray:
    """Harmonic change (Foote's novelty on chroma): at each frame, the L1 distance between the
    mean pitch-class distributions of the `half` frames after and the `half` frames before it;
    high where a chord changes, low inside a chord however the melody moves. (N,) for (12, N)."""
    c = chroma / np.maximum(chroma.sum(axis=0, keepdims=True), 1e-9)  # (12, N)
    n = c.shape[1]
    out = np.zeros(n)
    if n <= 2 * half:
        return out
    cs = np.concatenate([np.zeros((12, 1)), np.cumsum(c, axis=1)], axis=1)  # (12, N + 1)
    t = np.arange(half, n - half + 1)
    before, after = cs[:, t] - cs[:, t - half], cs[:, np.minimum(t + half, n)] - cs[:, t]
    out[half: n - half + 1] = np.abs(after - before).sum(axis=0) / half
    return out


def _acf(x: np.ndarray) -> np.ndarray:
    """Unbiased autocorrelation of `x` minus its mean, 1 at lag 0 (zeros when `x` is flat)."""
    x = x - x.mean()
    n = len(x)
    spec = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(spec * np.conj(spec))[:n]
    if ac[0] <= 0:
        return np.zeros(n)
    return ac / ac[0] * n / np.maximum(n - np.arange(n), 1)


def _at(ac: np.ndarray, lags: np.ndarray | float, max_lag: float) -> np.ndarray:
    """The (positive part of the) autocorrelation at fractional lags; 0 beyond `max_lag`."""
    lags = np.asarray(lags, dtype=np.float64)
    v = np.interp(lags, np.arange(len(ac)), np.clip(ac, 0.0, None))
    return np.where(lags <= max_lag, v, 0.0)


# how many beats one chord lasts (the harmonic rhythm), relative prior: one chord a 4/4 bar is
# the commonest, then two a bar or one every two bars, then 3/4 and 6/8 bars
_BEATS_PER_CHORD = {4: 1.0, 2: 0.4, 8: 0.35, 3: 0.35, 6: 0.25, 1: 0.15}


def _chord_period(change_env: np.ndarray, frame_rate: float) -> tuple[float | None, float]:
    """(period in frames, strength 0..1) of the harmonic rhythm: the shortest lag between
    0.5 and 6 s whose chroma-change autocorrelation is a local peak within 80 % of the
    strongest; (None, 0) when the chroma never changes regularly."""
    n = len(change_env)
    ac = _acf(change_env)
    lo, hi = int(0.5 * frame_rate), min(int(6.0 * frame_rate), int(0.6 * n))
    if hi <= lo + 2:
        return None, 0.0
    seg = np.clip(ac[lo:hi], 0.0, None)
    peaks = [i for i in range(1, len(seg) - 1) if seg[i] >= seg[i - 1] and seg[i] >= seg[i + 1] and seg[i] > 0]
    if not peaks:
        return None, 0.0
    top = max(seg[i] for i in peaks)
    first = next(i for i in peaks if seg[i] >= 0.8 * top)
    return float(lo + first), float(min(1.0, seg[first]))


def lagged_correlation(low: np.ndarray, high: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """Pearson correlation of `low` with `high` shifted later by each lag (frames, rounded; the
    best of a frame either way, for a performer's timing); 0 where too few frames overlap."""
    n = min(len(low), len(high))
    a, b = low[:n] - low[:n].mean(), high[:n] - high[:n].mean()
    norm = a.std() * b.std()
    out = np.zeros(len(lags))
    if norm <= 0:
        return out
    for i, lag in enumerate(np.rint(lags).astype(int)):
        vals = [np.dot(a[: n - l], b[l:]) / (n - l) for l in (lag - 1, lag, lag + 1) if 0 <= l < n - 8]
        out[i] = max(vals, default=0.0) / norm
    return out


def tempo(onset_env: np.ndarray, frame_rate: float, cfg: MeasureConfig,
          change_env: np.ndarray | None = None, onset_rate_hz: float | None = None,
          backbeat: tuple[np.ndarray, np.ndarray, float] | None = None) -> tuple[float | None, float, float]:
    """(BPM, confidence 0..1, octave confidence 0..1) from an onset-strength envelope sampled
    at `frame_rate` Hz.

    1. Periodicity: the envelope's autocorrelation; a beat period L scores its own peak plus
       half its subdivision (L/2) and its grouping (2L) peaks, which also keeps a dotted period
       (3 subdivisions) from passing for the beat.
    2. The best-scoring period under a broad log-normal prior gives the metrical grid; the beat
       is chosen among its octave neighbours (x1/2, x1, x2) and the 3:2 relatives by the
       periodicity (softened, `tempo_periodicity_weight`: it favours the slower octave wherever
       the bar repeats), a tighter tempo prior and the cues that name the beat: the harmonic
       rhythm (from `change_env`, a chroma change envelope at the same rate: a chord most
       often lasts 4 beats, `_BEATS_PER_CHORD`), the onset density (1-2 detected onsets a beat
       is the common case) and, with drums, the backbeat (`backbeat`: the onset envelopes
       under and over 120 Hz and the percussive ratio): a kick, then a snare a beat later, so
       the low band correlates with the high one a beat later, not half a beat or two.
    3. Confidence that the tempo is right up to an octave (half or double time, which the
       caption check accepts): the share of the candidates' total score held by the chosen
       one's octave family (against the 3:2 relatives), times the periodicity at the beat
       period, so a weak pulse or a duple/triple ambiguity reads unsure.
    4. The octave confidence: the chosen level's share of the beat-naming cues alone (not the
       periodicity, not the prior) against its strongest octave rival (half or double; 1 when
       neither is in range, 0.5 when no cue tells them apart). Which octave is the beat stays
       a guess on some clips without drums (docs/facts.md); this says which."""
    x = np.asarray(onset_env, dtype=np.float64)
    n = len(x)
    if n < 8 or not np.any(x - x.mean()):
        return None, 0.0, 0.0
    ac = _acf(x)
    max_lag = 0.6 * n  # beyond this, too few products for a stable estimate
    bpm = cfg.tempo_min_bpm * 2 ** np.arange(0, math.log2(cfg.tempo_max_bpm / cfg.tempo_min_bpm), 0.0025)
    lags = 60.0 * frame_rate / bpm

    def pulse(l: np.ndarray) -> np.ndarray:
        return _at(ac, l, max_lag) + 0.5 * _at(ac, l / 2, max_lag) + 0.5 * _at(ac, 2 * l, max_lag)

    def prior(b: np.ndarray, octaves: float) -> np.ndarray:
        return np.exp(-0.5 * (np.log2(b / cfg.tempo_prior_bpm) / octaves) ** 2)

    score = pulse(lags)
    if not np.any(score > 0):
        return None, 0.0, 0.0
    grid = float(bpm[np.argmax(score * prior(bpm, cfg.tempo_prior_octaves))])
    period, strength = _chord_period(change_env, frame_rate) if change_env is not None else (None, 0.0)
    factors = [f for f in (0.5, 2 / 3, 1.0, 1.5, 2.0) if cfg.tempo_min_bpm <= grid * f <= cfg.tempo_max_bpm]
    cands = np.array([grid * f for f in factors])
    binary = np.array([f in (0.5, 1.0, 2.0) for f in factors])  # the grid's octaves, not its 3:2 relatives
    # each candidate at its own local optimum (within 3 %) of the periodicity
    fine = []
    for c in cands:
        near = bpm[(bpm >= c / 1.03) & (bpm <= c * 1.03)]
        fine.append(float(near[np.argmax(pulse(60.0 * frame_rate / near))]) if near.size else float(c))
    cands = np.array(fine)
    cl = 60.0 * frame_rate / cands
    # the cues that name the beat among octaves, apart: the periodicity favours the slower level
    # wherever the bar repeats, and the prior is no evidence, so neither may make the octave sure
    cues = np.ones(len(cands))
    if period is not None:
        beats = period / (60.0 * frame_rate / cands)  # beats per chord under each candidate
        fit = np.array([max((w for k, w in _BEATS_PER_CHORD.items() if abs(b / k - 1) <= 0.08), default=0.15)
                        for b in beats])
        cues *= (1 - strength) + strength * fit
    if onset_rate_hz:
        per_beat = onset_rate_hz * 60.0 / cands
        cues *= np.exp(-0.5 * (np.log2(per_beat / 1.5)) ** 2)  # 1-2 onsets a beat, one octave either way
    # a beat: its own periodicity and its subdivision's (the grouping above it is as periodic
    # at every level of a regular meter, so it does not tell the beat from the half-bar)
    periodicity = _at(ac, cl, max_lag) + 0.5 * _at(ac, cl / 2, max_lag)
    tempo_prior = prior(cands, cfg.tempo_beat_prior_octaves)
    evidence = periodicity ** cfg.tempo_periodicity_weight * tempo_prior * cues
    if not evidence.sum() > 0:  # no candidate has any support: the grid, unsure
        return grid, 0.0, 0.0
    # duple or triple: the periodicity's to tell, at full weight (no octave bias between them) ...
    whole = periodicity * tempo_prior * cues
    family = binary == binary[int(np.argmax(evidence))]
    share = float(whole[family].sum() / max(whole.sum(), 1e-12))  # octaves pooled: the check accepts them
    # ... and which octave of it is the beat: with a kit, the backbeat's call too
    if backbeat is not None:
        low, high, perc_ratio = backbeat
        if perc_ratio is not None and perc_ratio >= cfg.tempo_backbeat_ratio:  # a kit, surely
            kick_snare = np.clip(lagged_correlation(low, high, cl), 0.01, None) ** cfg.tempo_backbeat_weight
            cues, evidence = cues * kick_snare, evidence * kick_snare
    best = int(np.argmax(np.where(family, evidence, -1.0)))
    ratio = cands / cands[best]
    rivals = np.flatnonzero((np.abs(ratio - 2) < 0.1) | (np.abs(ratio - 0.5) < 0.05))
    if rivals.size:
        rival = rivals[np.argmax(evidence[rivals])]
        octave = float(cues[best] / (cues[best] + cues[rival]))
    else:  # a 3:2 relative or the edge of the range: sure only when no octave of it is a tempo at all
        octave = 0.5 if cfg.tempo_min_bpm <= cands[best] / 2 or cands[best] * 2 <= cfg.tempo_max_bpm else 1.0
    at_beat = float(np.clip(_at(ac, 60.0 * frame_rate / cands[best], max_lag), 0.0, 1.0))
    # sub-grid precision: a parabola through the periodicity around the chosen tempo, where it
    # peaks there (a candidate at the edge of its 3 % window is on a slope: a parabola through a
    # slope has its vertex anywhere, once read as 499 BPM)
    i = int(np.argmin(np.abs(bpm - cands[best])))
    result = float(bpm[i])
    if 0 < i < len(bpm) - 1:
        y0, y1, y2 = score[i - 1: i + 2]
        den = y0 - 2 * y1 + y2
        if den < 0 and y1 >= max(y0, y2):  # then the vertex is within half a step
            result = float(bpm[i] * 2 ** (0.0025 * 0.5 * (y0 - y2) / den))
    return result, share * at_beat, octave


def musical_facts(mono: np.ndarray, sr: int, cfg: MeasureConfig, bandwidth_hz: float | None = None,
                  clipped: float = 0.0) -> dict:
    """Tempo, key, mode, percussive ratio and onset rate of a mono signal (any rate);
    `bandwidth_hz`, the clip's effective bandwidth, bounds the band drums are looked for in;
    `clipped`, its clipped fraction, says whether its transients may be taken for a kit's."""
    import librosa

    y = mono.astype(np.float32)
    if sr != ANALYSIS_SR:
        y = librosa.resample(y, orig_sr=sr, target_sr=ANALYSIS_SR, res_type="soxr_hq")
    sr = ANALYSIS_SR
    hop = 512
    stft = librosa.stft(y, n_fft=2048, hop_length=hop)
    harm, perc = librosa.decompose.hpss(stft, margin=(1.0, 2.0))  # a strict percussive part
    perc_power, power, freqs = np.abs(perc) ** 2, np.abs(stft) ** 2, librosa.fft_frequencies(sr=sr, n_fft=2048)
    perc_ratio = drum_transient_share(perc_power, power, freqs, 0.9 * bandwidth_hz if bandwidth_hz else 10_000.0)
    kick_ratio = kick_transient_share(perc_power, power, freqs)

    y_harm = librosa.istft(harm, hop_length=hop, length=len(y))
    with warnings.catch_warnings():  # a clip with no pitched content: no tuning, flat chroma
        warnings.simplefilter("ignore")
        chroma = librosa.feature.chroma_cqt(y=y_harm, sr=sr, hop_length=hop)  # (12, N)
        profile = chroma.mean(axis=1, dtype=np.float64)  # (12,): every note counts, by how long it sounds
        tonic, mode, r = key_from_chroma(profile)

    tempo_hop = hop // 2
    # SuperFlux (Boeck & Widmer 2013): log-magnitude flux on a fine log-frequency scale, against the
    # frame two hops back and a frequency max-filter, so vibrato and tremolo do not read as onsets
    n_mels, fmin, fmax = 138, 27.5, sr / 2
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=2048, hop_length=tempo_hop, n_mels=n_mels, fmin=fmin, fmax=fmax)
    mel_db = librosa.power_to_db(mel, ref=np.max)

    def superflux(bands: np.ndarray) -> np.ndarray:
        return librosa.onset.onset_strength(S=bands, sr=sr, hop_length=tempo_hop, lag=2, max_size=3)

    onset_env = superflux(mel_db)
    low = librosa.mel_frequencies(n_mels=n_mels + 2, fmin=fmin, fmax=fmax)[1:-1] < 120.0  # band centres: a kick, a bass
    low_env, high_env = superflux(mel_db[low]), superflux(mel_db[~low])
    onsets = librosa.onset.onset_detect(onset_envelope=onset_env, sr=sr, hop_length=tempo_hop)
    onset_rate = len(onsets) / (len(y) / sr)
    change = np.repeat(chroma_novelty(chroma, max(1, int(round(0.25 * sr / hop)))), 2)[: len(onset_env)]  # (N,) at the tempo hop
    kit = (low_env, high_env, perc_ratio) if clipped <= cfg.tempo_backbeat_max_clipped else None
    bpm, t_conf, t_octave = tempo(onset_env, sr / tempo_hop, cfg, change, onset_rate, kit)
    return {
        F.TEMPO_BPM: _finite(bpm),
        F.TEMPO_CONFIDENCE: t_conf,
        F.TEMPO_OCTAVE_CONFIDENCE: t_octave,
        F.KEY: F.KEY_NAMES[tonic],
        F.MODE: mode,
        F.KEY_CONFIDENCE: float(max(0.0, r)),
        F.PITCH_CLASS_PROFILE: [float(x) for x in profile / profile.sum()] if profile.sum() > 0 else None,
        F.PERCUSSIVE_RATIO: perc_ratio,
        F.KICK_RATIO: kick_ratio,
        F.ONSET_RATE_HZ: onset_rate,
    }


# --- the whole clip ----------------------------------------------------------------------------


def measure(audio: np.ndarray, sr: int, cfg: MeasureConfig = MeasureConfig()) -> dict:
    """Every fact of one clip, (T,) or (C, T) float audio at its native rate, keyed by the
    column names of `schemas.facts` (without `defects`). Assumes finite, non-silent samples
    (`pipeline.audio.SignalChecks` first)."""
    a = _as_channels(audio)  # (C, T)
    if not np.isfinite(a).all():
        raise ValueError("audio has NaN/Inf samples; check it with SignalChecks first")
    dc = a.mean(axis=1)  # (C,)
    mono = a.mean(axis=0) - float(a.mean())
    freqs, power = _power_spectrogram(mono, sr)  # (K,), (K, N)
    mean_power = power.mean(axis=1)
    bw = bandwidth(freqs, mean_power, sr, cfg)
    noise = noise_floor(power, cfg.noise_percentile, freqs, bw)
    total = float(mean_power[1:].mean())
    facts = {
        F.LOUDNESS_LUFS: loudness_lufs(a, sr),
        F.TRUE_PEAK_DBTP: true_peak_dbtp(a),
        F.CLIPPED_FRACTION: clipped_fraction(a, cfg.clip_run),
        F.BANDWIDTH_HZ: bw,
        F.BANDWIDTH_RATIO: bw / (sr / 2.0),
        F.NOISE_FLOOR_DBFS: _finite(float(_db(noise))),
        F.SNR_DB: _finite(float(_db(max(total - noise, _EPS)) - _db(noise))),
        F.SILENCE_FRACTION: silence_fraction(a, sr, cfg.silence_dbfs),
        F.DC_OFFSET: float(dc[np.argmax(np.abs(dc))]),
        F.STEREO_CORRELATION: stereo_correlation(a),
        F.SPECTRAL_CENTROID_HZ: spectral_centroid(freqs, power),
    }
    facts.update(musical_facts(mono, sr, cfg, bw, facts[F.CLIPPED_FRACTION]))
    return facts


def find_defects(facts: dict, th: DefectThresholds = DefectThresholds()) -> list[str]:
    """Names of the defects in `facts` (a `measure` result or a facts row), in `DEFECT_NAMES` order."""

    def over(name: str, limit: float) -> bool:
        v = facts.get(name)
        return v is not None and v > limit

    def under(name: str, limit: float) -> bool:
        v = facts.get(name)
        return v is not None and v < limit

    found = {
        F.CLIPPING: over(F.CLIPPED_FRACTION, th.clipped_fraction),
        F.BAND_LIMITED: under(F.BANDWIDTH_RATIO, th.band_limited_ratio)
        and (facts.get(F.BANDWIDTH_HZ) is None or facts[F.BANDWIDTH_HZ] < th.band_limited_hz),
        F.NOISY: under(F.SNR_DB, th.noisy_snr_db),
        F.TOO_QUIET: under(F.LOUDNESS_LUFS, th.too_quiet_lufs),
        F.DC: facts.get(F.DC_OFFSET) is not None and abs(facts[F.DC_OFFSET]) > th.dc_offset,
        F.SILENT_PARTS: over(F.SILENCE_FRACTION, th.silent_fraction),
        F.OUT_OF_PHASE: under(F.STEREO_CORRELATION, th.out_of_phase_correlation),
    }
    return [name for name in F.DEFECT_NAMES if found[name]]
