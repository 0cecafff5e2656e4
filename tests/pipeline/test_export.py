"""Export: WebDataset shards read by plain webdataset, byte-identical re-runs, resume, reports."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import export as E
from pipeline import fs
from pipeline import shards as W
from pipeline.backend import read_folder
from schemas import shard as S
from schemas import stats as Q
from schemas import tables as T

def decode_flac(data: bytes):
    audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return audio, rate


def shard_urls(out: Path) -> list[str]:
    return [str(p) for p in sorted(out.glob("*.tar"))]


def folder_bytes(out: Path) -> dict[str, bytes]:
    """Every file under `out` (state and resolved config included: the config names no folder)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ray_local(ray_session):
    """The session's embedded Ray (tests/conftest.py)."""
    yield ray_session


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, make_captions):
    return make_captions(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory, ray_local, export_to):
    out = tmp_path_factory.mktemp("shards")
    export_to(dataset, out)
    return out


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_plain_webdataset_reads_every_ok_sample(dataset, exported, make_captions):
    import webdataset as wds

    ds = wds.WebDataset(shard_urls(exported), shardshuffle=False, empty_check=False).decode(
        wds.handle_extension(S.AUDIO_EXT, decode_flac))
    samples = list(ds)
    table = read_folder(dataset).to_pylist()
    ok = {r[T.CLIP_ID]: r for r in table if r[T.STATUS] == T.OK}
    assert sorted(s["__key__"] for s in samples) == sorted(ok)
    for s in samples:
        assert set(s) >= {S.AUDIO_EXT, S.JSON_EXT}
        meta = s[S.JSON_EXT]
        assert S.validate_sample_json(meta) == []
        row = ok[s["__key__"]]
        assert meta[S.PROMPT] == row[T.PROMPT] and meta[S.QUALITY_LEVEL] == row[T.QUALITY_LEVEL]
        audio, rate = s[S.AUDIO_EXT]
        assert rate == row[T.SOURCE_SAMPLE_RATE] == meta[S.SAMPLE_RATE]
        assert audio.shape == (round(make_captions.clip_s * rate), row[T.SOURCE_CHANNELS])
        start = round(row[T.START_S] * rate)
        src, _ = sf.read(row[T.AUDIO_PATH], start=start, frames=len(audio), dtype="float32", always_2d=True)
        np.testing.assert_allclose(audio, src, atol=1.5 / 32768)  # lossless at PCM_16


@pytest.mark.slow
def test_samples_are_shuffled_and_shards_cut_by_count(exported):
    sizes = json.loads((exported / S.SIZES_FILE).read_text())
    assert list(sizes.values()) == [3, 3, 3, 3, 1]
    index = pq.read_table(exported / S.INDEX_FILE).to_pylist()
    order = [r[T.CLIP_ID] for r in index]
    assert order != sorted(order)  # shuffled before sharding
    assert [(r[S.SHARD], r[S.POSITION]) for r in index][:4] == [("shard-000000.tar", 0), ("shard-000000.tar", 1),
                                                                 ("shard-000000.tar", 2), ("shard-000001.tar", 0)]


@pytest.mark.slow
def test_non_ok_rows_are_reported_not_exported(dataset, exported, make_captions):
    report = json.loads((exported / S.REPORT_FILE).read_text())
    table = read_folder(dataset).to_pylist()
    left = sorted((r[T.CLIP_ID], r[T.STATUS], r[T.REASON]) for r in table if r[T.STATUS] != T.OK)
    assert sorted((r[T.CLIP_ID], r[T.STATUS], r[T.REASON]) for r in report["left_out"]["rows"]) == left
    assert report["left_out"]["counts"][T.REJECTED] == {make_captions.left_out[0][1]: 1, make_captions.left_out[1][1]: 1}
    assert report["exported"] == 13 and report["input_rows"] == 16
    exported_ids = set(pq.read_table(exported / S.INDEX_FILE).column(T.CLIP_ID).to_pylist())
    assert exported_ids.isdisjoint(r[0] for r in left)
    card = (exported / "README.md").read_text()
    assert "text_audio_mismatch" in card and "| rejected | silent | 1 |" in card and "decode failed" in card
    assert "&lt;b&gt;odd&lt;/b&gt;" in card and "<b>" not in card and "\\|" in card  # captions escaped
    for png in ("status_reasons.png", "pmos.png", "levels.png", "clap.png"):
        assert (exported / "card" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stats_and_config_travel_with_the_shards(dataset, exported):
    assert (exported / Q.STATS_FILE).read_bytes() == (dataset / Q.STATS_FILE).read_bytes()
    sid = Q.load(exported / Q.STATS_FILE).id
    index = pq.read_table(exported / S.INDEX_FILE)
    assert index.num_rows == 13
    cfg = json.loads((exported / S.CONFIG_FILE).read_text())
    assert cfg["seed"] == 0 and cfg["shard_max_count"] == 3
    import webdataset as wds

    metas = [s[S.JSON_EXT] for s in wds.WebDataset(shard_urls(exported), shardshuffle=False).decode()]
    assert {m[S.STATS_ID] for m in metas} == {sid}


@pytest.mark.slow
def test_export_twice_gives_byte_identical_shards(dataset, exported, tmp_path, export_to):
    again = tmp_path / "again"
    export_to(dataset, again)
    assert folder_bytes(again) == folder_bytes(exported)
    before = {p.name: p.stat().st_mtime_ns for p in again.glob("*.tar")}
    stage = E.main(E.ExportConfig(shard_max_count=3), dataset, again)
    assert stage.parts_skipped == stage.parts_total == 5  # a re-run writes no shard again
    assert {p.name: p.stat().st_mtime_ns for p in again.glob("*.tar")} == before
    assert folder_bytes(again) == folder_bytes(exported)


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_shards(dataset, exported, tmp_path, export_to):
    out = tmp_path / "killed"
    export_to(dataset, out)
    # what a run killed half way leaves: shards missing, one cut short, a stale state record,
    # a half-written temporary shard, and none of the final index files
    (out / "shard-000001.tar").unlink()
    with open(out / "shard-000002.tar", "r+b") as f:
        f.truncate(os.path.getsize(out / "shard-000002.tar") // 2)
    (out / "shard-000004.tar").unlink()
    (out / S.STATE_DIR / "shard-000003.tar.json").unlink()
    (out / f".shard-000004.tar{fs.TMP_MARK}4242").write_bytes(b"half a tar")
    for name in (S.SIZES_FILE, S.INDEX_FILE, S.CHECKSUMS_FILE, S.REPORT_FILE, "README.md"):
        (out / name).unlink()
    stage = E.main(E.ExportConfig(shard_max_count=3), dataset, out)
    assert stage.parts_skipped == 1  # shard 0 only; 1-4 were missing, cut short or unrecorded
    assert folder_bytes(out) == folder_bytes(exported)
    assert not list(out.glob(f".*{fs.TMP_MARK}*"))


@pytest.mark.slow
def test_run_killed_mid_way_resumes_to_the_same_shards(dataset, exported, tmp_path, export_to):
    """SIGKILL a real `mosaiq export` (driver, its Ray and its workers) once some shards exist."""
    out = tmp_path / "sigkill"
    cmd = [sys.executable, "-c", "import sys; from pipeline import export; sys.exit(export.cli(sys.argv[1:]))",
           "--input", str(dataset), "--output", str(out), "--shard-max-count", "1", "--address", "local"]
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(cmd, cwd=repo, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((out / S.STATE_DIR).glob("*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its raylet/GCS and workers: one group
        proc.wait(timeout=30)
    done = len(list((out / S.STATE_DIR).glob("*.json")))
    assert 0 < done < 13, f"{done} of 13 shards were done when the run was killed"
    assert not (out / S.SIZES_FILE).exists()
    E.main(E.ExportConfig(shard_max_count=1), dataset, out)
    reference = tmp_path / "reference"
    export_to(dataset, reference, shard_max_count=1)
    assert folder_bytes(out) == folder_bytes(reference)


@pytest.mark.slow
def test_changed_plan_rewrites_and_removes_stale_shards(dataset, exported, tmp_path, export_to):
    out = tmp_path / "replan"
    export_to(dataset, out, shard_max_count=2)  # 7 shards
    assert len(shard_urls(out)) == 7
    export_to(dataset, out)  # 5 shards of 3: every name's content changes, two names go
    assert folder_bytes(out) == folder_bytes(exported)


@pytest.mark.slow
def test_seed_changes_the_order(dataset, exported, tmp_path, export_to):
    out = tmp_path / "seed1"
    export_to(dataset, out, seed=1)
    a = pq.read_table(exported / S.INDEX_FILE).column(T.CLIP_ID).to_pylist()
    b = pq.read_table(out / S.INDEX_FILE).column(T.CLIP_ID).to_pylist()
    assert sorted(a) == sorted(b) and a != b


@pytest.mark.slow
def test_resample_and_mono(dataset, tmp_path, ray_local, export_to, make_captions):
    import webdataset as wds

    out = tmp_path / "mono8k"
    export_to(dataset, out, sample_rate=8000, mono=True, shard_max_count=100)
    for s in wds.WebDataset(shard_urls(out), shardshuffle=False).decode(wds.handle_extension(S.AUDIO_EXT, decode_flac)):
        audio, rate = s[S.AUDIO_EXT]
        assert rate == s[S.JSON_EXT][S.SAMPLE_RATE] == 8000
        assert audio.shape == (round(make_captions.clip_s * 8000), 1)
        assert 0.1 < float(np.abs(audio).max()) <= 1.0


@pytest.mark.slow
def test_shard_bytes_bound(dataset, tmp_path, ray_local, export_to):
    out = tmp_path / "bybytes"
    limit = 50_000  # a 0.5 s stereo 22.05 kHz clip is ~44 kB as PCM: one or two per shard
    export_to(dataset, out, shard_max_count=100, shard_max_bytes=limit)
    sizes = json.loads((out / S.SIZES_FILE).read_text())
    assert len(sizes) > 5 and sum(sizes.values()) == 13
    assert all(p.stat().st_size <= limit for p in out.glob("*.tar"))


def test_plan_is_independent_of_part_layout(dataset, tmp_path):
    table = E.read_captions(dataset)
    one = tmp_path / "one"
    fs.write_parts(table.take(np.arange(table.num_rows)[::-1]), one, rows_per_part=100)
    cfg = E.ExportConfig(shard_max_count=3)
    a = E.plan_shards(E.split_rows(table)[0], cfg)
    b = E.plan_shards(E.split_rows(E.read_captions(one))[0], cfg)
    assert [s.digest() for s in a] == [s.digest() for s in b]


@pytest.mark.parametrize("key", ["a.b", "../etc", "a/b", "", "x" * 91, "a b", "..", ".hidden"])
def test_refuses_unsafe_keys(dataset, key):
    table = E.read_captions(dataset)
    ids = table.column(T.CLIP_ID).to_pylist()
    ids[0] = key
    bad = table.set_column(table.schema.get_field_index(T.CLIP_ID), T.CLIP_ID, pa.array(ids))
    with pytest.raises(E.ExportError, match="refusing"):
        E.split_rows(bad)
    with pytest.raises(E.ExportError, match="refusing"):
        E.check_key(key)


def test_refuses_duplicate_ids_and_mismatched_stats(dataset, tmp_path):
    table = E.read_captions(dataset)
    with pytest.raises(E.ExportError, match="duplicate"):
        E.split_rows(pa.concat_tables([table, table.slice(0, 1)]))
    other = Q.make(count=1, fit=None, mu=3.0, sigma=0.5, fixed=True, band_multipliers=(-2, -1, 1, 2),
                   prefix_low_below=-2, prefix_medium_within=1, prefix_high_above=2)
    Q.dump(other, tmp_path / "other.json")
    with pytest.raises(E.ExportError, match="stats id"):
        E.load_stats(tmp_path / "other.json", E.split_rows(table)[0])


def test_stats_found_in_a_sibling_folder_by_id(dataset, tmp_path, make_stats):
    root = tmp_path / "run"
    (root / "quality").mkdir(parents=True)
    shutil.copytree(dataset, root / "captions", ignore=shutil.ignore_patterns(Q.STATS_FILE))
    ok = E.split_rows(E.read_captions(root / "captions"))[0]
    cfg = E.ExportConfig()
    assert E.find_stats(cfg, root / "captions", ok) is None
    other = Q.make(count=1, fit=None, mu=3.0, sigma=0.5, fixed=True, band_multipliers=(-2, -1, 1, 2),
                   prefix_low_below=-2, prefix_medium_within=1, prefix_high_above=2)
    Q.dump(other, root / "quality" / Q.STATS_FILE)
    with pytest.raises(E.ExportError, match="pass --stats"):
        E.find_stats(cfg, root / "captions", ok)
    Q.dump(make_stats(), root / "quality" / Q.STATS_FILE)
    assert E.find_stats(cfg, root / "captions", ok) == root / "quality" / Q.STATS_FILE


def test_ok_row_with_missing_level_is_an_error_not_a_silent_skip(dataset):
    table = E.read_captions(dataset)
    ok, _ = E.split_rows(table)
    levels = ok.column(T.QUALITY_LEVEL).to_pylist()
    levels[2] = None
    ok = ok.set_column(ok.schema.get_field_index(T.QUALITY_LEVEL), T.QUALITY_LEVEL, pa.array(levels, pa.int8()))
    with pytest.raises(E.ExportError, match="quality_level"):
        E.plan_shards(ok, E.ExportConfig())


@pytest.mark.slow
def test_cli_writes_shards(dataset, tmp_path, ray_local, capsys):
    out = tmp_path / "cli"
    assert E.cli(["--input", str(dataset), "--output", str(out), "--shard-max-count", "5", "--seed", "3"]) == 0
    assert json.loads((out / S.SIZES_FILE).read_text()) == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 3}
    assert "mosaiq verify" in capsys.readouterr().out
    assert E.cli(["--input", str(tmp_path / "nope"), "--output", str(out)]) == 2


@pytest.mark.slow
def test_audio_gone_since_ingest_is_an_error_row_and_comes_back_on_rerun(dataset, tmp_path, ray_local):
    """An ok row whose source file moved away after ingest: the run goes on without it, reports
    it as an `error` row, and a re-run once the file is back exports it."""
    from pipeline import verify

    table = read_folder(dataset)
    ok_rows = [i for i, s in enumerate(table.column(T.STATUS).to_pylist()) if s == T.OK]
    victim = ok_rows[4]
    moved = tmp_path / "moved.wav"
    paths = table.column(T.AUDIO_PATH).to_pylist()
    source, paths[victim] = paths[victim], str(moved)
    table = table.set_column(table.schema.get_field_index(T.AUDIO_PATH), T.AUDIO_PATH, pa.array(paths, pa.string()))
    captions = tmp_path / "captions"
    fs.write_parts(table, captions, rows_per_part=7)
    shutil.copy(dataset / Q.STATS_FILE, captions / Q.STATS_FILE)
    key = table.column(T.CLIP_ID)[victim].as_py()

    out = tmp_path / "shards"
    stage = E.main(E.ExportConfig(shard_max_count=3), captions, out)
    assert stage.rows_written == 12 and stage.status_counts[T.ERROR] == 2
    report = json.loads((out / S.REPORT_FILE).read_text())
    assert report["exported"] == 12
    (row,) = [r for r in report["left_out"]["rows"] if r[T.CLIP_ID] == key]
    assert row[T.STATUS] == T.ERROR and row[T.REASON].startswith(W.FAILED_REASON) and str(moved) in row[T.REASON]
    index = pq.read_table(out / S.INDEX_FILE)
    assert key not in index.column(T.CLIP_ID).to_pylist() and index.num_rows == 12
    assert sum(json.loads((out / S.SIZES_FILE).read_text()).values()) == 12
    assert verify.main(verify.VerifyConfig(str(out))).ok  # index, sizes, checksums and tars agree
    assert W.FAILED_REASON in (out / "README.md").read_text()

    shutil.copy(source, moved)  # the file is back
    again = E.main(E.ExportConfig(shard_max_count=3), captions, out)
    assert again.rows_written == 13 and again.parts_skipped == again.parts_total - 1  # only its shard is redone
    assert key in pq.read_table(out / S.INDEX_FILE).column(T.CLIP_ID).to_pylist()
    assert verify.main(verify.VerifyConfig(str(out))).ok


def test_write_shard_in_process_is_reproducible_and_resumable(dataset, tmp_path):
    """One shard written without Ray: same bytes twice, fixed member metadata in plan order,
    the same bytes as a plain USTAR tar of its members (format version 1), skipped when done."""
    import tarfile

    plan = E.plan_shards(E.split_rows(E.read_captions(dataset))[0], E.ExportConfig(shard_max_count=3))
    spec = plan[0]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ra, rb = W.write_shard(spec, str(a)), W.write_shard(spec, str(b))
    data = (a / spec.name).read_bytes()
    assert data == (b / spec.name).read_bytes() and ra == rb
    assert not ra.skipped and ra.count == 3 and ra.failed == () and ra.sha256 == fs.sha256_file(a / spec.name)
    with tarfile.open(a / spec.name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    assert [m.name for m, _ in members] == [f"{s.key}.{ext}" for s in spec.samples for ext in (S.AUDIO_EXT, S.JSON_EXT)]
    for m, _ in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for m, body in members:
            tar.addfile(m, io.BytesIO(body))
    assert data == reference.getvalue()
    before = (a / spec.name).stat().st_mtime_ns
    again = W.write_shard(spec, str(a))
    assert again.skipped and again.sha256 == ra.sha256 and (a / spec.name).stat().st_mtime_ns == before
    assert not list(a.glob(f".*{fs.TMP_MARK}*")) and not list((a / S.STATE_DIR).glob(f".*{fs.TMP_MARK}*"))
