import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import ingest, score
from pipeline import backend
from pipeline.backend import WORK_DIR, read_folder
from schemas import tables as T

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def write(path, x, sr=16000, **kw):
    sf.write(path, x, sr, **kw)
    return path


@pytest.fixture(scope="module")
def stage():
    return score.ScoreStage(score.ScoreConfig())


def test_stage_scores_ok_rows_and_reports_bad_samples(tmp_path, stage, ingest_to):
    rng = np.random.default_rng(0)
    t = np.arange(3 * 16000) / 16000
    music = (0.3 * np.sin(2 * np.pi * 330 * t) * (1 + 0.5 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)
    nan = music.copy()
    nan[100:200] = np.nan
    inf = music.copy()
    inf[5] = np.inf
    write(tmp_path / "music.wav", music)
    write(tmp_path / "nan.wav", nan, subtype="FLOAT")
    write(tmp_path / "inf.wav", inf, subtype="FLOAT")
    write(tmp_path / "silent.wav", np.zeros_like(music))
    write(tmp_path / "dc.wav", np.full_like(music, 0.5))  # clipped to a constant: no signal left
    write(tmp_path / "hiss.flac", (1e-5 * rng.standard_normal(len(music))).astype(np.float32), subtype="PCM_24")
    write(tmp_path / "inverted.wav", np.stack([music, -music]).T)  # one channel's polarity flipped
    table = ingest_to(tmp_path, tmp_path / "clips")
    # a row that was already rejected upstream passes through untouched
    out = stage(table)
    rows = {Path(r[T.AUDIO_PATH]).name: r for r in out.to_pylist()}
    assert out.num_rows == table.num_rows and out.schema.equals(T.SCORES_SCHEMA)
    assert rows["music.wav"][T.STATUS] == T.OK and 1 <= rows["music.wav"][T.PMOS] <= 5
    assert rows["music.wav"][T.SCORER] == "distillmos"
    assert rows["nan.wav"][T.STATUS] == T.REJECTED and rows["nan.wav"][T.REASON].startswith("non_finite_samples: 100 ")
    assert rows["inf.wav"][T.REASON].startswith("non_finite_samples: 1 ")
    for name in ("silent.wav", "dc.wav", "hiss.flac", "inverted.wav"):
        assert rows[name][T.STATUS] == T.REJECTED and rows[name][T.REASON].startswith("silent"), name
        assert rows[name][T.PMOS] is None
    # loud in each channel, silent in mono: the reason says why, not just "silent"
    assert rows["inverted.wav"][T.REASON].startswith("silent in mono: its channels cancel in the downmix")
    assert "stereo correlation -1.00: out of phase" in rows["inverted.wav"][T.REASON]
    assert rows["silent.wav"][T.REASON].startswith("silent: ")


def test_stage_passes_non_ok_rows_and_catches_files_that_changed(tmp_path, stage, ingest_to):
    write(tmp_path / "a.wav", (0.2 * np.sin(np.arange(48000) / 7)).astype(np.float32))
    write(tmp_path / "b.wav", (0.2 * np.sin(np.arange(48000) / 5)).astype(np.float32))
    (tmp_path / "z.wav").write_bytes(b"")
    table = ingest_to(tmp_path, tmp_path / "clips")
    data = (tmp_path / "b.wav").read_bytes()
    (tmp_path / "b.wav").write_bytes(data[: len(data) // 3])  # truncated after ingest
    rows = {Path(r[T.AUDIO_PATH]).name: r for r in stage(table).to_pylist()}
    assert rows["z.wav"][T.STATUS] == T.ERROR and rows["z.wav"][T.REASON] == "empty file (0 bytes)"
    assert rows["b.wav"][T.STATUS] == T.ERROR and rows["b.wav"][T.REASON].startswith(T.CHANGED_SINCE_INGEST)
    assert rows["a.wav"][T.STATUS] == T.OK


def test_stage_names_missing_columns(stage, ingest_to):
    import pyarrow as pa

    with pytest.raises(T.SchemaError, match="score: input is missing column"):
        stage(pa.table({T.CLIP_ID: ["x"]}))


@pytest.fixture(scope="module")
def sample_clips(sample_dir, tmp_path_factory, ingest_to):
    out = tmp_path_factory.mktemp("clips")
    ingest_to(sample_dir / "manifest.csv", out, ingest.IngestConfig(rows_per_part=12))
    return out


def test_actors_holding_every_cpu_are_warned_about(caplog):
    """A pool that holds every CPU starves Ray Data's read tasks: the run would wait forever."""
    from pipeline.backend import _warn_if_no_cpu_left
    from pipeline.stage import Resources

    with caplog.at_level("WARNING", logger="pipeline.backend"):
        assert _warn_if_no_cpu_left("score", Resources(concurrency=1, num_cpus=2.0), 2.0)
        assert "1 actor(s) x 2 CPU = 2 of the cluster's 2 CPUs" in caplog.text
        assert _warn_if_no_cpu_left("score", Resources(concurrency=2, num_cpus=1.0), 2.0)
    assert not _warn_if_no_cpu_left("score", Resources(concurrency=1, num_cpus=1.0), 2.0)
    assert not _warn_if_no_cpu_left("score", Resources(concurrency=4, num_cpus=0.0, num_gpus=1.0), 2.0)


class _Plans(logging.Handler):
    """Ray Data's "Execution plan of Dataset ..." lines, which mosaiq keeps out of its log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.plans = []

    def emit(self, record):
        if "Execution plan" in record.getMessage():
            self.plans.append(record.getMessage())


@pytest.mark.slow
def test_ray_job_is_resumable_and_deterministic(sample_clips, tmp_path, ray_session, caplog, monkeypatch):
    cfg = score.ScoreConfig()
    first = tmp_path / "s1"
    plans, quiet = _Plans(), backend.quiet_ray_data
    ray_data_log = logging.getLogger("ray.data")
    # (after Ray Data has set up its logging, which replaces the handlers of "ray.data")
    monkeypatch.setattr(backend, "quiet_ray_data",
                        lambda: (quiet(), ray_data_log.setLevel(logging.INFO), ray_data_log.addHandler(plans)))
    try:
        report = score.main(cfg, sample_clips, first)
    finally:
        ray_data_log.removeHandler(plans)
    # the decoding runs in its own CPU tasks: Ray Data fuses it into the model actors unless
    # their remote args differ ("ActorPoolMapOperator[MapBatches(_prepare_batch)->...]")
    assert plans.plans and all("TaskPoolMapOperator[MapBatches(_prepare_batch)] -> ActorPoolMapOperator" in p
                               for p in plans.plans), plans.plans
    assert report.rows_written == 33 and report.status_counts == {T.OK: 30, T.ERROR: 3}
    assert not (first / WORK_DIR).exists()
    parts = sorted(p.name for p in first.glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    written = pq.read_schema(first / parts[0])
    assert written.equals(T.SCORES_SCHEMA) and written.metadata[b"mosaiq.table"] == b"scores"
    # a re-run over finished output does nothing
    again = score.main(cfg, sample_clips, first)
    assert again.parts_skipped == 3 and again.rows_written == 0

    # the state a worker killed mid-run leaves: one part missing, some of its rows already in
    # _work/ (from the first run), and a half-written work file; the re-run must fill in the
    # rest without duplicates and give the same bytes
    second = tmp_path / "s2"
    shutil.copytree(first, second)
    (second / "part-00001.parquet").unlink()
    done = pq.read_table(first / "part-00001.parquet").slice(0, 5)
    work = backend.work_folder(second, sample_clips / "part-00001.parquet",
                               backend.stage_params(T.SCORES_SCHEMA, score.params(cfg)))
    work.mkdir(parents=True)
    pq.write_table(done, work / "earlier_0.parquet")
    (work / "killed_1.parquet").write_bytes(b"PAR1 half a file")
    with caplog.at_level(logging.INFO, logger="pipeline.backend"):
        resumed = score.main(cfg, sample_clips, second)
    assert resumed.parts_skipped == 2 and resumed.rows_written == 12
    assert "resuming, 5 row(s) already computed" in caplog.text  # the earlier rows were found, not redone
    for name in parts:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert read_folder(second).num_rows == 33


def _submit(address, env, args, timeout_s=900):
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.time() + 120
    while True:
        proc = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
                               "--", "python", "pipeline/score.py", *args],
                              env=env, capture_output=True, text=True, timeout=timeout_s, cwd=REPO)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


@pytest.mark.slow
def test_ray_job_submit_scores_the_sample(sample_clips, tmp_path, ray_head):
    address, env = ray_head
    out = tmp_path / "scores"
    proc = _submit(address, env, ["--input", str(sample_clips), "--output", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    table = read_folder(out)
    clips = read_folder(sample_clips)
    assert sorted(table.column(T.CLIP_ID).to_pylist()) == sorted(clips.column(T.CLIP_ID).to_pylist())
    rows = table.to_pylist()
    errors = {Path(r[T.AUDIO_PATH]).name for r in rows if r[T.STATUS] == T.ERROR}
    assert errors == {"bad_empty.wav", "bad_notes.mp3", "bad_truncated.wav"}
    ok = [r for r in rows if r[T.STATUS] == T.OK]
    assert len(ok) == 30 and all(1 <= r[T.PMOS] <= 5 for r in ok)
    assert json.loads((out / score.CONFIG_FILE).read_text())["scorer"] == "distillmos"

    # the default scorer ranks each clean clip above its degraded copies for most pairs
    by_pair = {}
    for r in ok:
        meta = json.loads(r[T.METADATA_JSON])
        by_pair.setdefault(meta["pair_id"], {})[meta["degradation"]] = r[T.PMOS]
    pairs = [(p["none"], s) for p in by_pair.values() for d, s in p.items() if d != "none"]
    wins = sum(clean > degraded for clean, degraded in pairs)
    assert len(pairs) == 24
    assert wins / len(pairs) >= 0.75, f"clean ranked above degraded in only {wins}/{len(pairs)} pairs: {by_pair}"


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("tf32", [True, False])
def test_a_gpu_scorer_runs_tf32_unless_told_not_to(tf32):
    import torch

    score.ScoreStage(score.ScoreConfig(device="cuda", tf32=tf32))
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


@pytest.mark.slow
def test_a_changed_analyze_setting_reuses_the_scores_of_unchanged_clips(sample_clips, tmp_path, ray_session, caplog):
    """An analyze threshold changes every facts part, so score computes every part again; the
    p-MOS of a clip depends on its audio alone, so it comes from the previous output, under the
    new facts, and no model runs. Under other score params nothing is taken."""
    from pipeline import analyze
    from pipeline import facts as FX
    from pipeline.analyze import AnalyzeConfig
    from schemas import facts as F

    facts, scores = tmp_path / "facts", tmp_path / "scores"
    analyze.main(AnalyzeConfig(), sample_clips, facts)
    cfg = score.ScoreConfig()
    score.main(cfg, facts, scores)
    before = {r[T.CLIP_ID]: r for r in read_folder(scores).to_pylist()}
    analyze.main(AnalyzeConfig(thresholds=FX.DefectThresholds(noisy_snr_db=500.0)), sample_clips, facts)
    with caplog.at_level(logging.INFO, logger="pipeline.backend"):
        report = score.main(cfg, facts, scores)
    assert report.parts_skipped == 0 and report.rows_written == 33
    assert "score: 30 row(s) taken from the previous output" in caplog.text
    assert "resuming" not in caplog.text
    assert not re.search(r"score: \d+/\d+ row\(s\)", caplog.text)  # no rows went through the scorer actors
    after = read_folder(scores).to_pylist()
    assert {r[T.CLIP_ID]: (r[T.STATUS], r[T.PMOS]) for r in after} == {k: (r[T.STATUS], r[T.PMOS]) for k, r in before.items()}
    assert all(F.NOISY in r[F.DEFECTS] for r in after if r[T.STATUS] == T.OK)  # the new facts, not the old rows
    # the parts record their params; under other params (another silence level) nothing is reused
    part, work = sorted(facts.glob("part-*.parquet"))[0], tmp_path / "work"
    other = backend.stage_params(T.SCORES_SCHEMA, score.params(score.ScoreConfig(silence_dbfs=-95.0)))
    assert backend._reuse_previous(score.ScoreStage, {"cfg": cfg}, str(part), str(scores / part.name), other, str(work), "t") == (0, 0)
    same = backend.stage_params(T.SCORES_SCHEMA, score.params(cfg))
    assert backend._reuse_previous(score.ScoreStage, {"cfg": cfg}, str(part), str(scores / part.name), same, str(work), "t")[0] > 0
