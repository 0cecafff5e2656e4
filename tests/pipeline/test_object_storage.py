"""Object storage: every stage reads and writes `s3://` through one layer (`pipeline.fs`), checked
against a real S3 server (moto's server mode on 127.0.0.1), and a stage runs on a two-node Ray
cluster through `ray job submit` with nothing on a shared disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf

from pipeline import audio, backend, fs, ingest
from schemas import shard as S
from schemas import tables as T

REPO = Path(__file__).resolve().parents[2]
MOSAIQ = Path(sys.executable).parent / "mosaiq"


def s3fs_():
    import fsspec

    return fsspec.filesystem("s3")


def upload_wavs(bucket: str, folder: str, n: int, sr: int = 16000, seconds: float = 3.0) -> list[str]:
    """`n` short tones (and nothing else) uploaded under `bucket/folder`; their URLs."""
    import io

    urls = []
    t = np.arange(int(seconds * sr)) / sr
    for i in range(n):
        buf = io.BytesIO()
        sf.write(buf, (0.3 * np.sin(2 * np.pi * (220 + 55 * i) * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
        url = f"{bucket}/{folder}/tone{i}.wav"
        fs.atomic_write_bytes(url, buf.getvalue())
        urls.append(url)
    return urls


# --- the layer itself ------------------------------------------------------------------------


def test_parts_markers_and_atomic_writes_on_s3(s3_bucket):
    folder = f"{s3_bucket}/stage"
    table = pa.table({T.CLIP_ID: [f"c{i}" for i in range(5)]})
    fs.write_parts(table, folder, rows_per_part=2)
    parts = fs.list_parts(folder)
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert str(parts[0]).startswith("s3://")
    assert backend.read_folder(folder).column(T.CLIP_ID).to_pylist() == table.column(T.CLIP_ID).to_pylist()
    # same bytes: not written again (a re-run leaves an unchanged part as it is)
    assert not fs.write_if_changed(parts[0], fs.table_bytes(table.slice(0, 2)))

    # a writer that fails half way leaves nothing under the final name (one upload at the end)
    with pytest.raises(RuntimeError):
        with fs.atomic_open(f"{folder}/half.bin", "wb") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("killed")
    assert not fs.location(f"{folder}/half.bin").exists()
    assert fs.remove_temporaries(folder) == []

    # the stage marker and lock work there too; another stage's folder is refused
    with fs.stage_output("score", f"{s3_bucket}/clips", f"{s3_bucket}/scores") as out:
        assert (out / fs.LOCK_FILE).exists()
    assert not fs.location(f"{s3_bucket}/scores/{fs.LOCK_FILE}").exists()
    marker = json.loads(fs.location(f"{s3_bucket}/scores/{fs.MARKER_FILE}").read_text())
    assert marker == {"stage": "score", "input": f"{s3_bucket}/clips"}
    with pytest.raises(fs.FolderError, match="holds the output of stage 'score'"):
        with fs.stage_output("analyze", f"{s3_bucket}/clips", f"{s3_bucket}/scores"):
            pass
    with pytest.raises(fs.FolderError, match="holds files that mosaiq did not write"):
        with fs.stage_output("score", f"{s3_bucket}/clips", folder):
            pass


def test_a_missing_bucket_or_unreachable_endpoint_is_named_before_any_work(s3_server, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"s3://no-such-bucket-mosaiq/out.*bucket 'no-such-bucket-mosaiq' does not exist"):
        with fs.stage_output("score", "/tmp/in", "s3://no-such-bucket-mosaiq/out"):
            pytest.fail("the block must not run")
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")  # nothing listens there
    fs.set_storage_options({"s3": {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}})
    try:
        with pytest.raises(ValueError, match=r"'s3://some-bucket/out': cannot reach the object store"):
            fs.check_reachable("s3://some-bucket/out", "score output")
    finally:
        fs.set_storage_options(None)
    with pytest.raises(ValueError, match="http:// is not a storage mosaiq reads or writes"):
        fs.location("http://example.com/a.wav")


def test_refused_credentials_are_named_before_any_work(monkeypatch):
    """A second S3 server that checks credentials (moto with authentication on from the first
    request): unknown keys are one clear error naming the URL."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(PermissionError, match=r"score output 's3://any-bucket/out': access refused .*check the credentials"):
            with fs.stage_output("score", "/tmp/in", "s3://any-bucket/out"):
                pytest.fail("the block must not run")
    finally:
        server.kill()
        server.wait()


def test_storage_options_come_from_the_job_yaml_and_are_never_saved(tmp_path):
    from jobs import config as jobcfg
    from pipeline.score import ScoreConfig

    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("storage_options:\n  s3: {endpoint_url: 'http://127.0.0.1:9', key: k, secret: s}\nscore: {scorer: distillmos}\n")
    try:
        cfg = jobcfg.load(ScoreConfig, str(cfg_file), section="score")
        assert fs.storage_options() == {"s3": {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}}
        assert json.loads(os.environ[fs.STORAGE_ENV])["s3"]["key"] == "k"  # what this node's workers read
        assert "storage_options" not in json.dumps(jobcfg.to_dict(cfg))
    finally:
        fs.set_storage_options(None)
    assert fs.STORAGE_ENV not in os.environ
    cfg_file.write_text("storage_options: [s3]\n")
    with pytest.raises(jobcfg.ConfigError, match="storage_options must map a protocol"):
        jobcfg.load(ScoreConfig, str(cfg_file), section="score")


def test_ingest_from_s3_gives_the_rows_of_the_same_files_on_disk(s3_bucket, tmp_path):
    urls = upload_wavs(s3_bucket, "audio", 3)
    fs.atomic_write_bytes(f"{s3_bucket}/audio/sub/notes.mp3", b"liner notes, not audio")
    fs.atomic_write_bytes(f"{s3_bucket}/audio/readme.txt", b"not listed")
    local = tmp_path / "audio"
    (local / "sub").mkdir(parents=True)
    for u in urls:
        (local / fs.location(u).name).write_bytes(fs.location(u).read_bytes())
    (local / "sub" / "notes.mp3").write_bytes(b"liner notes, not audio")

    cfg = ingest.IngestConfig(clip_seconds=2.0, min_seconds=0.5)
    remote = ingest.main(cfg, f"{s3_bucket}/audio", f"{s3_bucket}/clips", progress=False)
    on_disk = ingest.main(cfg, local, tmp_path / "clips", progress=False)
    a, b = backend.read_folder(f"{s3_bucket}/clips"), backend.read_folder(tmp_path / "clips")
    assert remote.status_counts == on_disk.status_counts == {T.OK: 6, T.ERROR: 1}
    assert a.column(T.AUDIO_PATH).to_pylist()[0] == f"{s3_bucket}/audio/sub/notes.mp3"  # the full URL, in walk order
    ok = [st == T.OK for st in a.column(T.STATUS).to_pylist()]
    assert [c for c, k in zip(a.column(T.CLIP_ID).to_pylist(), ok) if k] == \
        [c for c, k in zip(b.column(T.CLIP_ID).to_pylist(), ok) if k]  # from content: the same ids
    for col in (T.SOURCE_DIGEST, T.START_S, T.DURATION_S, T.SOURCE_SAMPLE_RATE, T.SOURCE_SIZE_BYTES, T.STATUS):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    # libsndfile words the same failure differently for a file name and a stream
    assert [r.split(":")[0] for r in a.column(T.REASON).to_pylist()] == [r.split(":")[0] for r in b.column(T.REASON).to_pylist()]
    assert all(m for m, k in zip(a.column(T.SOURCE_MTIME_NS).to_pylist(), ok) if k)  # LastModified, for the identity check

    # a manifest in the bucket with paths relative to it
    fs.atomic_write_text(f"{s3_bucket}/manifest.csv", "path,caption\naudio/x/../tone0.wav,a tone\naudio/gone.wav,x\n")
    ingest.main(cfg, f"{s3_bucket}/manifest.csv", f"{s3_bucket}/clips2", progress=False)
    rows = backend.read_folder(f"{s3_bucket}/clips2").to_pylist()
    assert [r[T.AUDIO_PATH] for r in rows] == [urls[0]] * 2 + [f"{s3_bucket}/audio/gone.wav"]
    assert rows[-1][T.STATUS] == T.ERROR and "unreadable" in rows[-1][T.REASON]
    # confinement: a manifest naming objects outside its folder's prefix
    fs.atomic_write_text(f"{s3_bucket}/m/outside.csv", f"path\n{urls[1]}\n")
    ingest.main(cfg, f"{s3_bucket}/m/outside.csv", f"{s3_bucket}/clips3", progress=False)
    assert T.OUTSIDE_ROOTS in backend.read_folder(f"{s3_bucket}/clips3").column(T.REASON)[0].as_py()


def test_an_object_that_vanishes_after_ingest_is_an_error_row_reason(s3_bucket):
    url = upload_wavs(s3_bucket, "audio", 1)[0]
    size, mtime = fs.size_and_mtime(url)
    assert audio.load_clip(url, 0.0, 1.0, 16000).shape == (16000,)
    audio.check_unchanged(url, size, mtime)
    s3fs_().rm(fs.location(url).path)
    with pytest.raises(audio.AudioError, match="unreadable"):
        audio.check_unchanged(url, size, mtime)
    with pytest.raises(audio.AudioError, match="decode failed"):
        audio.load_clip(url, 0.0, 1.0, 16000)


def test_an_m4a_in_a_bucket_is_probed_and_read_through_ffmpeg_as_on_disk(s3_bucket, tmp_path):
    """FFmpeg reads an object through its fsspec file (ranges), as libsndfile does: the same
    probe and the same samples as the file on disk, and a truncated object is the same row."""
    pytest.importorskip("av", reason="PyAV (the ffmpeg extra) is not installed")
    from tests.pipeline.test_ffmpeg import encode, loud_start, signal

    local = tmp_path / "song.m4a"
    encode(local, signal(3.0), "aac", options={"movflags": "faststart"})
    url = f"{s3_bucket}/audio/song.m4a"
    s3fs_().put(str(local), fs.location(url).path)
    assert audio.probe(url) == audio.probe(local)
    np.testing.assert_array_equal(audio.load_clip(url, 1.1, 1.0, None, mono=False), audio.load_clip(local, 1.1, 1.0, None, mono=False))
    cut = f"{s3_bucket}/audio/cut.m4a"
    fs.atomic_write_bytes(cut, local.read_bytes()[: local.stat().st_size // 2])
    with pytest.raises(audio.AudioError, match="truncated: the container declares"):
        audio.probe(cut)
    vbr = tmp_path / "vbr.mp3"  # the MP3 header check reads its ranges of the object too
    encode(vbr, loud_start(signal(4.0)), "libmp3lame", options={"write_xing": "0"}, qscale=2)
    url = f"{s3_bucket}/audio/vbr.mp3"
    s3fs_().put(str(vbr), fs.location(url).path)
    assert audio.probe(url) == audio.probe(vbr) and audio.probe(url).format == "FFMPEG:mp3float"


# --- the demo in a bucket, end to end ----------------------------------------------------------


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOSAIQ), *args], capture_output=True, text=True, timeout=1500, **kw)


def _bucket_files(url: str) -> list[str]:
    base = fs.location(url).path
    return sorted(p[len(base) + 1:] for p in s3fs_().find(base))


def _small_demo(tmp_path: Path) -> Path:
    """jobs/demo.yaml on two of its tracks (10 clips and the 3 broken files, not 33): the bucket
    is what is tested here; the whole demo runs on disk in test_curate."""
    import yaml

    job = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    job["sample"]["tracks"] = 2
    path = tmp_path / "demo_small.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.slow
def test_curate_demo_in_a_bucket_kill_export_and_read_with_webdataset(s3_bucket, tmp_path):
    out = f"{s3_bucket}/demo"
    work = tmp_path / "cwd"
    work.mkdir()
    config = str(_small_demo(tmp_path))
    proc = _run(["curate", "--config", config, "--output", out], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(work.iterdir()) == []  # nothing written on the local disk
    files = _bucket_files(out)
    for folder in ("sample/audio", "clips", "facts", "scores", "quality", "captions", "shards"):
        assert any(f.startswith(folder + "/") for f in files), folder
    assert not any("_work/" in f or fs.TMP_MARK in f or f.endswith(fs.LOCK_FILE) for f in files), files
    # every row accounted for, as on disk
    clips = backend.read_folder(f"{out}/clips")
    captions = backend.read_folder(f"{out}/captions")
    assert sorted(captions.column(T.CLIP_ID).to_pylist()) == sorted(clips.column(T.CLIP_ID).to_pylist())
    report = json.loads(fs.location(f"{out}/shards/{S.REPORT_FILE}").read_text())
    assert report["exported"] + len(report["left_out"]["rows"]) == captions.num_rows
    sums = fs.location(f"{out}/shards/{S.CHECKSUMS_FILE}").read_text()

    # a second run finds every part and shard done by listing the bucket: nothing is rewritten
    def data_objects() -> dict[str, str]:
        found = s3fs_().find(fs.location(out).path, detail=True)
        return {k: str(v["LastModified"]) for k, v in found.items() if k.endswith((".parquet", S.SHARD_EXT))}

    before = data_objects()
    proc = _run(["curate", "--config", config, "--output", out], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data_objects() == before
    for stage in ("analyze", "score", "quantize", "caption"):
        line = next(x for x in proc.stdout.splitlines() if x.startswith(stage + " "))
        total, done = map(int, re.search(r"(\d+) part\(s\), (\d+) already done", line).groups())
        assert total == done > 0, line

    # kill an export half way (one sample per shard: many uploads), then run it again; its
    # shards are the bytes of an export that was never killed
    def export(dest: str) -> list[str]:
        return [str(MOSAIQ), "export", "--config", config, "--input", f"{out}/captions",
                "--output", dest, "--shard-max-count", "1"]

    proc = _run(export(f"{s3_bucket}/unbroken")[1:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = f"{s3_bucket}/again"
    p = subprocess.Popen(export(again), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if any(f.endswith(S.SHARD_EXT) for f in _bucket_files(again)):
            break
        time.sleep(0.1)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    half = [f for f in _bucket_files(again) if f.endswith(S.SHARD_EXT)]
    proc = _run(export(again)[1:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    unbroken = fs.location(f"{s3_bucket}/unbroken/{S.CHECKSUMS_FILE}").read_text()
    assert fs.location(f"{again}/{S.CHECKSUMS_FILE}").read_text() == unbroken
    assert len(unbroken.splitlines()) == report["exported"]
    proc = _run(["verify", again])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 0 < len(half) < report["exported"], f"not killed half way: {len(half)} shard(s) of {report['exported']}"

    # plain webdataset reads the shards straight from the bucket (a pipe: URL through fsspec)
    import webdataset as wds

    names = [line.split("  ")[1] for line in sums.splitlines()]
    cat = (f"pipe:{sys.executable} -c \"import sys, shutil, fsspec; "
           f"shutil.copyfileobj(fsspec.open(sys.argv[1]).open(), sys.stdout.buffer)\" ")
    urls = [cat + f"{out}/shards/{n}" for n in names]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == report["exported"] > 0
    rate = sf.info(__import__("io").BytesIO(samples[0][S.AUDIO_EXT])).samplerate
    assert rate > 0 and json.loads(samples[0][S.JSON_EXT])[S.PROMPT]


# --- two Ray nodes, no shared disk -------------------------------------------------------------


@pytest.mark.slow
def test_ray_job_submit_on_two_nodes_scores_clips_in_a_bucket(s3_bucket, ray_two_nodes, tmp_path):
    dashboard, env, _ = ray_two_nodes
    upload_wavs(s3_bucket, "audio", 4)
    ingest.main(ingest.IngestConfig(clip_seconds=2.0, min_seconds=0.5), f"{s3_bucket}/audio", f"{s3_bucket}/clips",
                progress=False)
    runtime_env = json.dumps({"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                                          "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}})
    deadline = time.time() + 120
    while True:
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(REPO),
             "--runtime-env-json", runtime_env, "--", "python", "pipeline/score.py",
             "--input", f"{s3_bucket}/clips", "--output", f"{s3_bucket}/scores", "--batch-size", "4"],
            env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        if "No available agent" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scores = backend.read_folder(f"{s3_bucket}/scores")
    assert scores.num_rows == 8 and set(scores.column(T.STATUS).to_pylist()) == {T.OK}
    assert all(1 <= v <= 5 for v in scores.column(T.PMOS).to_pylist())
    assert not any("_work/" in f for f in _bucket_files(f"{s3_bucket}/scores"))
