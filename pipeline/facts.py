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
  within `cliff_span_octaves` after which every band stays under `cliff_floor_db` (near the
  16-bit quantization floor: almost nothing). A recording's noise floor is well above that, so
  a soft instrument with little treble over its noise floor has no cliff. No cliff: Nyquist.
- noise floor and SNR: minimum statistics; per frequency bin a low percentile of the frame
  powers (bias-corrected for an exponential distribution), then a running median across
  frequency so that sustained partials do not count as noise.
- tempo: autocorrelation of the onset-strength envelope, a comb over the beat's multiples and a
  log-normal tempo prior; confidence is the normalized autocorrelation at the beat period.
- key and mode: harmonic part (HPSS), CQT chroma (median over frames), correlated with the 24 rotations of the
  Krumhansl-Kessler major and minor profiles; confidence is the best correlation.
- percussive ratio: percussive share of the STFT energy after median-filter HPSS.
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


@dataclass(frozen=True)
class MeasureConfig:
    """How the facts are measured (not thresholds for defects: see `DefectThresholds`)."""

    silence_dbfs: float = T.SILENCE_DBFS  # a 50 ms frame whose RMS is under this is silent
    clip_run: int = 3  # consecutive samples at the peak level that make a clipped run
    cliff_drop_db: float = 30.0  # a band-limit cliff falls at least this much ...
    cliff_span_octaves: float = 1.0  # ... within this span ...
    cliff_floor_db: float = -90.0  # ... to under this level, dB re full-scale white noise density
    noise_percentile: float = 10.0  # per-bin percentile of frame powers taken as the noise floor
    tempo_min_bpm: float = 40.0
    tempo_max_bpm: float = 240.0
    tempo_prior_bpm: float = 120.0  # centre of the log-normal tempo prior (librosa's default)
    tempo_prior_octaves: float = 1.0  # its standard deviation, octaves

    def __post_init__(self):
        if not 0 < self.noise_percentile < 50:
            raise ValueError(f"noise_percentile must be in (0, 50), got {self.noise_percentile}")
        if not 0 < self.tempo_min_bpm < self.tempo_max_bpm:
            raise ValueError(f"need 0 < tempo_min_bpm < tempo_max_bpm, got {self.tempo_min_bpm}, {self.tempo_max_bpm}")
        if self.clip_run < 2:
            raise ValueError(f"clip_run must be >= 2, got {self.clip_run}")


@dataclass(frozen=True)
class DefectThresholds:
    """When a technical fact becomes a defect flag (see docs/facts.md for the reasoning)."""

    clipped_fraction: float = 1e-3  # clipping: more than 0.1 % of samples in flat-top runs
    band_limited_ratio: float = 0.85  # band_limited: a cliff under 85 % of Nyquist (CD anti-alias filters sit at ~0.9)
    noisy_snr_db: float = 15.0  # noisy: estimated SNR under 15 dB
    too_quiet_lufs: float = -40.0  # too_quiet: integrated loudness under -40 LUFS
    dc_offset: float = 0.01  # dc_offset: a channel mean beyond 1 % of full scale (-40 dBFS)
    silent_fraction: float = 0.5  # silent_parts: more than half of the 50 ms frames silent


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
    x = a[:5].T.astype(np.float64)  # (T, C); BS.1770 weights exist for up to 5 channels
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


def bandwidth(freqs: np.ndarray, mean_power: np.ndarray, sr: int, cfg: MeasureConfig) -> float:
    """Effective bandwidth in Hz: the edge of a spectral cliff, or Nyquist when there is none."""
    nyq = sr / 2.0
    n_bands = min(256, len(freqs) - 1)
    edges = np.linspace(0, len(freqs) - 1, n_bands + 1).astype(int)
    power_b = np.array([mean_power[edges[i]:max(edges[i + 1], edges[i] + 1)].mean() for i in range(n_bands)])
    level = _db(power_b)
    centre = np.array([freqs[edges[i]:max(edges[i + 1], edges[i] + 1)].mean() for i in range(n_bands)])
    level_s = ndimage.median_filter(level, size=3, mode="nearest")  # one-band spurs do not count
    above = np.maximum.accumulate(level_s[::-1])[::-1]  # loudest band at or above each band
    half = 2 ** (cfg.cliff_span_octaves / 2)
    for i in range(n_bands):
        f = centre[i]
        if f < 100.0 or f > 0.98 * nyq:
            continue
        below = level[(centre > f / half) & (centre <= f)]
        j = np.searchsorted(centre, f * half)
        if j >= n_bands or below.size == 0:
            break
        top, rest = float(np.median(below)), float(above[j])
        if rest <= cfg.cliff_floor_db and top - rest >= cfg.cliff_drop_db:
            return _edge(centre, power_b, j)
    return nyq


def _edge(centre: np.ndarray, power_b: np.ndarray, top: int) -> float:
    """The cliff's edge: going down from band `top`, the first band whose third-octave level is
    within 30 dB of the loudest third-octave level of the two octaves below it."""
    lo = np.searchsorted(centre, centre * 2 ** (-1 / 6))
    hi = np.searchsorted(centre, centre * 2 ** (1 / 6), side="right")
    csum = np.concatenate([[0.0], np.cumsum(power_b)])
    smooth = _db((csum[hi] - csum[lo]) / np.maximum(hi - lo, 1))  # third-octave levels
    for e in range(top, -1, -1):
        below = smooth[(centre >= centre[e] / 4) & (centre <= centre[e])]
        if smooth[e] >= below.max() - 30.0:
            return float(centre[e])
    return float(centre[top])


def noise_floor(power: np.ndarray, percentile: float) -> float:
    """Power of the stationary noise: per bin a low percentile of the frame powers, divided by
    that percentile of an exponential distribution (a noise bin's power), then a running median
    over 31 bins so sustained partials are not taken for noise."""
    q = np.percentile(power, percentile, axis=1) / -math.log(1 - percentile / 100.0)  # (K,)
    smooth = np.exp(ndimage.median_filter(np.log(np.maximum(q, _EPS)), size=31, mode="nearest"))
    return float(smooth[1:].mean())  # without the DC bin


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


def key_from_chroma(chroma: np.ndarray) -> tuple[int, str, float]:
    """(tonic pitch class, mode, correlation) of the best of the 24 key profiles for a
    12-bin pitch-class profile (C first)."""
    c = np.asarray(chroma, dtype=np.float64)
    best = (0, F.MAJOR, -2.0)
    for mode, profile in ((F.MAJOR, _KK_MAJOR), (F.MINOR, _KK_MINOR)):
        for tonic in range(12):
            r = float(np.corrcoef(c, np.roll(profile, tonic))[0, 1])
            if np.isfinite(r) and r > best[2]:
                best = (tonic, mode, r)
    return best


def _interp_peak(ac: np.ndarray, lag: int) -> float:
    """Sub-sample position of the peak at `lag` (parabolic interpolation)."""
    if lag <= 0 or lag >= len(ac) - 1:
        return float(lag)
    a, b, c = ac[lag - 1], ac[lag], ac[lag + 1]
    den = a - 2 * b + c
    return float(lag + 0.5 * (a - c) / den) if den < 0 else float(lag)


def tempo(onset_env: np.ndarray, frame_rate: float, cfg: MeasureConfig) -> tuple[float | None, float]:
    """(BPM, confidence) from an onset-strength envelope sampled at `frame_rate` Hz."""
    x = onset_env - onset_env.mean()
    if len(x) < 8 or not np.any(x):
        return None, 0.0
    n = len(x)
    spec = np.fft.rfft(x, 2 * n)
    ac = np.fft.irfft(spec * np.conj(spec))[:n]
    ac = ac / ac[0] * n / np.maximum(n - np.arange(n), 1)  # unbiased, 1 at lag 0
    lo = max(1, int(frame_rate * 60 / cfg.tempo_max_bpm))
    hi = min(n // 2 - 1, int(math.ceil(frame_rate * 60 / cfg.tempo_min_bpm)))
    if hi <= lo:
        return None, 0.0
    lags = np.arange(lo, hi + 1)

    def at(l: np.ndarray) -> np.ndarray:  # the autocorrelation at (fractional) lags, 0 past the end
        return np.interp(l, np.arange(n), np.clip(ac, 0, None), right=0.0)

    # metrical comb: a beat period is supported by its multiples and by its half (a subdivision);
    # the half term keeps a dotted period (3 subdivisions) from passing for the beat
    comb = at(lags) + 0.5 * at(lags / 2) + 0.5 * at(2 * lags) + 0.25 * at(4 * lags)
    bpm = 60.0 * frame_rate / lags
    prior = np.exp(-0.5 * (np.log2(bpm / cfg.tempo_prior_bpm) / cfg.tempo_prior_octaves) ** 2)
    best = int(lags[np.argmax(comb * prior)])
    # refine the period on the furthest multiple whose peak is still clear
    period = _interp_peak(ac, best)
    for k in (4, 2):
        m = int(round(best * k))
        if m + 2 < n // 2:
            w = max(1, int(round(0.03 * m)))
            seg = ac[m - w: m + w + 1]
            peak = m - w + int(np.argmax(seg))
            if ac[peak] > 0.5 * ac[best]:
                period = _interp_peak(ac, peak) / k
                break
    conf = float(np.clip(ac[best], 0.0, 1.0))
    return 60.0 * frame_rate / period, conf


def musical_facts(mono: np.ndarray, sr: int, cfg: MeasureConfig) -> dict:
    """Tempo, key, mode, percussive ratio and onset rate of a mono signal (any rate)."""
    import librosa

    y = mono.astype(np.float32)
    if sr != ANALYSIS_SR:
        y = librosa.resample(y, orig_sr=sr, target_sr=ANALYSIS_SR, res_type="soxr_hq")
    sr = ANALYSIS_SR
    hop = 512
    stft = librosa.stft(y, n_fft=2048, hop_length=hop)
    harm, perc = librosa.decompose.hpss(stft)
    e_h, e_p = float(np.sum(np.abs(harm) ** 2)), float(np.sum(np.abs(perc) ** 2))
    perc_ratio = e_p / (e_h + e_p) if e_h + e_p > 0 else None

    y_harm = librosa.istft(harm, hop_length=hop, length=len(y))
    with warnings.catch_warnings():  # a clip with no pitched content: no tuning, flat chroma
        warnings.simplefilter("ignore")
        chroma = librosa.feature.chroma_cqt(y=y_harm, sr=sr, hop_length=hop)  # (12, N)
        tonic, mode, r = key_from_chroma(np.median(chroma, axis=1))  # the median ignores passing notes

    tempo_hop = 256
    onset_env = librosa.onset.onset_strength(y=y, sr=sr, hop_length=tempo_hop)
    bpm, t_conf = tempo(onset_env, sr / tempo_hop, cfg)
    onsets = librosa.onset.onset_detect(onset_envelope=onset_env, sr=sr, hop_length=tempo_hop)
    return {
        F.TEMPO_BPM: _finite(bpm),
        F.TEMPO_CONFIDENCE: t_conf,
        F.KEY: F.KEY_NAMES[tonic],
        F.MODE: mode,
        F.KEY_CONFIDENCE: float(max(0.0, r)),
        F.PERCUSSIVE_RATIO: perc_ratio,
        F.ONSET_RATE_HZ: len(onsets) / (len(y) / sr),
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
    noise = noise_floor(power, cfg.noise_percentile)
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
    facts.update(musical_facts(mono, sr, cfg))
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
        F.BAND_LIMITED: under(F.BANDWIDTH_RATIO, th.band_limited_ratio),
        F.NOISY: under(F.SNR_DB, th.noisy_snr_db),
        F.TOO_QUIET: under(F.LOUDNESS_LUFS, th.too_quiet_lufs),
        F.DC: facts.get(F.DC_OFFSET) is not None and abs(facts[F.DC_OFFSET]) > th.dc_offset,
        F.SILENT_PARTS: over(F.SILENCE_FRACTION, th.silent_fraction),
    }
    return [name for name in F.DEFECT_NAMES if found[name]]
