"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from pipeline import export as E
from pipeline import fs
from schemas import stats as Q
from schemas import tables as T


def _ingest_to(input_path, output_dir, cfg=None):
    """Run the ingest stage and return the table it wrote."""
    from pipeline import ingest
    from pipeline.backend import read_folder

    ingest.main(cfg or ingest.IngestConfig(), input_path, output_dir, progress=False)
    return read_folder(output_dir)


@pytest.fixture(scope="session")
def ingest_to():
    """`ingest_to(input, output, cfg=None) -> table`: ingest a folder or manifest, read it back."""
    return _ingest_to


# --- export: seeded synthetic audio and a caption table that points at it ----------------------

CLIP_S = 0.5
LEFT_OUT = [  # (status, reason) of the rows that must not be exported
    (T.REJECTED, "text_audio_mismatch"),
    (T.REJECTED, "silent: -71.0 dBFS after removing DC (threshold -60.0 dBFS)"),
    (T.ERROR, "decode failed: unexpected end of file"),
]


def make_stats() -> Q.QualityStats:
    return Q.make(count=10, fit=None, mu=3.8, sigma=0.2, fixed=True, band_multipliers=(-2, -1, 1, 2),
                  prefix_low_below=-2, prefix_medium_within=1, prefix_high_above=2)


def make_captions(root: Path, n_ok: int = 13, seed: int = 0, stats: Q.QualityStats | None = None) -> Path:
    """Write source audio (mono 16 kHz WAV, stereo 22.05 kHz FLAC) and a 2-part caption table."""
    rng = np.random.default_rng(seed)
    stats = stats or make_stats()
    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True)
    sources = []
    for i, (rate, channels, ext) in enumerate([(16000, 1, "wav"), (22050, 2, "flac")]):
        n = int(rate * CLIP_S * (n_ok + len(LEFT_OUT)))
        t = np.arange(n) / rate
        tone = 0.3 * np.sin(2 * np.pi * (220 + 110 * i) * t)[:, None] + 0.05 * rng.standard_normal((n, channels))
        path = audio_dir / f"src{i}.{ext}"
        sf.write(path, tone.astype(np.float32), rate, subtype="PCM_16")
        sources.append((str(path), rate, channels, n / rate))
    rows = []
    statuses = [(T.OK, "")] * n_ok + LEFT_OUT
    for j, (status, reason) in enumerate(statuses):
        path, rate, channels, total = sources[j % 2]
        ok = status == T.OK
        level = int(rng.integers(1, 6))
        prefix = [Q.PREFIX_LOW, "", Q.PREFIX_MEDIUM, "", Q.PREFIX_HIGH][level - 1]
        original = f"a synth tune number {j} | with <b>odd</b> text"
        caption = original if j % 3 == 0 else f"bright synthesizer melody {j} over soft noise"
        rows.append({**T.blank_row(T.CAPTIONS_SCHEMA),
            T.CLIP_ID: f"{j:04d}c{seed:02d}" + "ab" * 4, T.AUDIO_PATH: path, T.SOURCE_DIGEST: fs.file_digest(path),
            T.START_S: (j // 2) * CLIP_S, T.DURATION_S: CLIP_S, T.SOURCE_DURATION_S: total,
            T.SOURCE_SIZE_BYTES: None, T.SOURCE_MTIME_NS: None,
            T.SOURCE_SAMPLE_RATE: rate, T.SOURCE_CHANNELS: channels, T.SOURCE_FORMAT: "WAV" if rate == 16000 else "FLAC",
            T.CAPTION_ORIGINAL: original, T.TAGS: ["synth"], T.METADATA_JSON: "{}",
            T.STATUS: status, T.REASON: reason,
            T.PMOS: None if status == T.ERROR else float(3.0 + rng.random() * 1.5), T.SCORER: "test",
            T.QUALITY_LEVEL: level if ok else None, T.QUALITY_PREFIX: prefix, T.STATS_ID: stats.id,
            T.CANDIDATES: [caption], T.CANDIDATE_REJECTS: [], T.CLAP_ORIGINAL: float(rng.random() * 0.5),
            T.CLAP_CANDIDATES: [0.4], T.CLAP_SCORE: float(0.2 + rng.random() * 0.5) if status != T.ERROR else None,
            T.CAPTION: caption, T.CAPTION_SOURCE: "original" if caption == original else "candidate",
            T.CAPTION_NOTE: "", T.PROMPT: f"{prefix}, {caption}" if prefix else caption,
        })
    table = T.conform(pa.Table.from_pylist(rows), T.CAPTIONS_SCHEMA)
    captions = root / "captions"
    fs.write_parts(table, captions, rows_per_part=7)
    Q.dump(stats, captions / Q.STATS_FILE)
    return captions


def export(captions: Path, out: Path, **kw) -> E.ExportConfig:
    cfg = E.ExportConfig(**{"shard_max_count": 3, **kw})
    E.main(cfg, captions, out)
    return cfg


def run_in_process(fn, calls, **_):
    """`pipeline.backend.run_tasks` without Ray: every call in this process, in order."""
    return [fn(*args) for args in calls]



make_captions.clip_s = CLIP_S  # what the tests check against
make_captions.left_out = LEFT_OUT


@pytest.fixture(scope="session", name="make_captions")
def make_captions_fixture():
    """`make_captions(root, n_ok=13, seed=0, stats=None) -> captions folder` (with `.clip_s`,
    `.left_out`): source audio and a 2-part caption table that points at it."""
    return make_captions


@pytest.fixture(scope="session", name="make_stats")
def make_stats_fixture():
    """`make_stats()`: fixed quality stats (the official edges)."""
    return make_stats


@pytest.fixture(scope="session")
def export_to():
    """`export_to(captions, out, **ExportConfig fields) -> config`: the export stage, 3 per shard."""
    return export


@pytest.fixture(scope="session")
def in_process_tasks():
    """A stand-in for `pipeline.backend.run_tasks` that runs every call here, in order (named
    as such: for tests of the shard writing itself, without starting Ray)."""
    return run_in_process
