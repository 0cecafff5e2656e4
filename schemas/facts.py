"""The measured facts of a clip (stage analyze): column names with units, Arrow fields, the
defect names of the `defects` column and the reasons the caption check gives.

A fact is null when the clip was not measured (a row that is not `ok` on input, or that
failed to decode) or when the measure does not apply (stereo correlation of a mono clip,
loudness of a clip shorter than one 400 ms gating block).
"""

from __future__ import annotations

import pyarrow as pa


# --- technical facts -----------------------------------------------------------------------
LOUDNESS_LUFS = "loudness_lufs"  # integrated loudness, ITU-R BS.1770-4 (gated), LUFS
TRUE_PEAK_DBTP = "true_peak_dbtp"  # 4x-oversampled peak, dB true peak (0 = full scale)
CLIPPED_FRACTION = "clipped_fraction"  # share of samples in runs of >= 3 at the clip's peak level, 0..1
BANDWIDTH_HZ = "bandwidth_hz"  # effective bandwidth: the spectral cliff's edge, or Nyquist when none
BANDWIDTH_RATIO = "bandwidth_ratio"  # bandwidth_hz / Nyquist, 0..1
NOISE_FLOOR_DBFS = "noise_floor_dbfs"  # RMS level of the stationary noise estimate (a white noise at the floor's dB-mean level over the band), dBFS
SNR_DB = "snr_db"  # signal power over the noise estimate, dB
SILENCE_FRACTION = "silence_fraction"  # share of 50 ms frames under the silence level, 0..1
DC_OFFSET = "dc_offset"  # largest per-channel mean, in full-scale units (signed)
STEREO_CORRELATION = "stereo_correlation"  # Pearson correlation of the first two channels, -1..1

# --- musical facts ---------------------------------------------------------------------------
TEMPO_BPM = "tempo_bpm"  # beats per minute
TEMPO_CONFIDENCE = "tempo_confidence"  # 0..1: pulse clarity, right up to half/double time
TEMPO_OCTAVE_CONFIDENCE = "tempo_octave_confidence"  # 0..1: that the BPM is the beat, not its half or double
KEY = "key"  # tonic pitch class: "C", "C#", ..., "B" ("" when not measured)
MODE = "mode"  # "major" or "minor" ("" when not measured)
KEY_CONFIDENCE = "key_confidence"  # 0..1: correlation of the chroma with the best key profile
# how much each pitch class sounds: the harmonic part's mean chroma, 12 shares summing to 1, C
# first (the caption check refutes a key claim that no key it accepts fits, even when the key is not sure)
PITCH_CLASS_PROFILE = "pitch_class_profile"
PERCUSSIVE_RATIO = "percussive_ratio"  # energy share of noise-like percussive transients from 1 kHz up (snare, hats), 0..1
KICK_RATIO = "kick_ratio"  # energy share of percussive transients under 150 Hz (kick drum), 0..1
# the default percussive ratio from which drums are sure: the caption check's (drums_present_ratio)
# and the tempo's (tempo_backbeat_ratio: the backbeat names the beat only with a kit)
DRUMS_SURE_RATIO = 0.004
ONSET_RATE_HZ = "onset_rate_hz"  # detected onsets per second
SPECTRAL_CENTROID_HZ = "spectral_centroid_hz"  # energy-weighted mean of the frames' centroids, Hz

DEFECTS = "defects"  # names of the technical defects found (list, empty when none)

KEY_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
MAJOR, MINOR = "major", "minor"

# --- defect names (values of `defects`) ------------------------------------------------------
CLIPPING = "clipping"
BAND_LIMITED = "band_limited"
NOISY = "noisy"
TOO_QUIET = "too_quiet"
DC = "dc_offset"
SILENT_PARTS = "silent_parts"
OUT_OF_PHASE = "out_of_phase"  # the channels (nearly) cancel in the mono downmix that p-MOS, CLAP and the trainer hear
DEFECT_NAMES = (CLIPPING, BAND_LIMITED, NOISY, TOO_QUIET, DC, SILENT_PARTS, OUT_OF_PHASE)
DEFECT_REASON_PREFIX = "defect:"  # reason of a row rejected for a defect: "defect:clipping"

# --- caption check reasons -------------------------------------------------------------------
CONTRADICTS_TEMPO = "contradicts_tempo"
CONTRADICTS_KEY = "contradicts_key"
CONTRADICTS_DRUMS = "contradicts_drums"
CHECK_REASONS = (CONTRADICTS_TEMPO, CONTRADICTS_KEY, CONTRADICTS_DRUMS)

# what analyze measures, and how: part of its parts' params, so a folder analyzed by an older
# mosaiq is measured again (3: the pitch-class profile; 4: the bandwidth edge at any sample rate,
# the loudness of 5.1 files; 5: no tempo outside tempo_min_bpm..tempo_max_bpm; 6: Vorbis and
# Opus surround channels in WAVE order)
FACTS_VERSION = 6

FACT_FIELDS = [
    pa.field(LOUDNESS_LUFS, pa.float64()),
    pa.field(TRUE_PEAK_DBTP, pa.float64()),
    pa.field(CLIPPED_FRACTION, pa.float64()),
    pa.field(BANDWIDTH_HZ, pa.float64()),
    pa.field(BANDWIDTH_RATIO, pa.float64()),
    pa.field(NOISE_FLOOR_DBFS, pa.float64()),
    pa.field(SNR_DB, pa.float64()),
    pa.field(SILENCE_FRACTION, pa.float64()),
    pa.field(DC_OFFSET, pa.float64()),
    pa.field(STEREO_CORRELATION, pa.float64()),
    pa.field(TEMPO_BPM, pa.float64()),
    pa.field(TEMPO_CONFIDENCE, pa.float64()),
    pa.field(TEMPO_OCTAVE_CONFIDENCE, pa.float64()),
    pa.field(KEY, pa.string(), nullable=False),
    pa.field(MODE, pa.string(), nullable=False),
    pa.field(KEY_CONFIDENCE, pa.float64()),
    pa.field(PITCH_CLASS_PROFILE, pa.list_(pa.float64())),
    pa.field(PERCUSSIVE_RATIO, pa.float64()),
    pa.field(KICK_RATIO, pa.float64()),
    pa.field(ONSET_RATE_HZ, pa.float64()),
    pa.field(SPECTRAL_CENTROID_HZ, pa.float64()),
    pa.field(DEFECTS, pa.list_(pa.string()), nullable=False),
]
FACT_NAMES = [f.name for f in FACT_FIELDS]



def __getattr__(name: str):
    """`FACTS_SCHEMA`, the analyze stage's table, is defined with the other tables (schemas.tables)."""
    if name == "FACTS_SCHEMA":
        from schemas.tables import FACTS_SCHEMA

        return FACTS_SCHEMA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
