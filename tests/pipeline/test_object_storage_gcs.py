"""Object storage on `gs://`: the one storage layer (`pipeline.fs`, gcsfs underneath) checked
against a local GCS emulator (gcp-storage-emulator on 127.0.0.1, objects in memory), and a stage
run end to end on the embedded Ray with its input, audio and output in a bucket."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import backend, fs, ingest
from schemas import facts as F
from schemas import tables as T


def gcsfs_():
    """A gcsfs filesystem of its own (not the one pipeline.fs opens), to look at the bucket."""
    import fsspec

    return fsspec.filesystem("gs", token="anon", skip_instance_cache=True)


def objects(url: str) -> dict[str, dict]:
    """Every object under `url`: its path relative to `url` -> gcsfs's info (generation, size...)."""
    base = fs.location(url).path.rstrip("/")
    return {k[len(base) + 1:]: v for k, v in gcsfs_().find(base, detail=True).items()}


def tone_wav(i: int, sr: int = 16000, seconds: float = 3.0) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * (220 + 55 * i) * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def upload_wavs(bucket: str, folder: str, n: int) -> list[str]:
    """`n` short tones (and nothing else) uploaded under `bucket/folder`; their URLs."""
    urls = [f"{bucket}/{folder}/tone{i}.wav" for i in range(n)]
    for i, url in enumerate(urls):
        fs.atomic_write_bytes(url, tone_wav(i))
    return urls


# --- the layer itself ------------------------------------------------------------------------


def test_parts_round_trip_and_unchanged_parts_are_not_uploaded_again(gcs_bucket):
    folder = f"{gcs_bucket}/stage"
    table = pa.table({T.CLIP_ID: [f"c{i}" for i in range(5)], "n": list(range(5))})
    written = fs.write_parts(table, folder, rows_per_part=2)
    parts = fs.list_parts(folder)
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [str(p) for p in parts] == [str(p) for p in written] and str(parts[0]).startswith(f"{gcs_bucket}/stage/")
    assert sorted(objects(folder)) == [p.name for p in parts]  # nothing else in the bucket: no temporaries
    assert backend.read_folder(folder).equals(table)
    assert backend.read_folder(folder, columns=["n"]).column("n").to_pylist() == [0, 1, 2, 3, 4]
    assert fs.read_metadata(parts[2]).num_rows == 1 and fs.read_schema(parts[0]) == table.schema

    # the same table again: no part is uploaded again (same generation); a changed row rewrites its part only
    before = {k: v["generation"] for k, v in objects(folder).items()}
    assert not fs.write_if_changed(parts[0], fs.table_bytes(table.slice(0, 2)))
    fs.write_parts(table, folder, rows_per_part=2)
    assert {k: v["generation"] for k, v in objects(folder).items()} == before
    changed = table.set_column(1, "n", pa.array([0, 1, 2, 3, 40]))
    fs.write_parts(changed, folder, rows_per_part=2)
    after = {k: v["generation"] for k, v in objects(folder).items()}
    assert [k for k in sorted(after) if after[k] != before[k]] == ["part-00002.parquet"]
    assert backend.read_folder(folder).equals(changed)

    # an empty folder, or one with no parts, is named
    with pytest.raises(FileNotFoundError, match=rf"input folder '{gcs_bucket}/nothing' does not exist"):
        fs.list_parts(f"{gcs_bucket}/nothing")
    fs.atomic_write_text(f"{gcs_bucket}/other/readme.txt", "no parts here")
    with pytest.raises(FileNotFoundError, match=r"holds no part-\*\.parquet files"):
        fs.list_parts(f"{gcs_bucket}/other")


def test_atomic_writes_appear_under_their_final_name_only_when_complete(gcs_bucket):
    folder = f"{gcs_bucket}/out"
    target = f"{folder}/big.bin"
    data = np.random.default_rng(0).integers(0, 256, 6 * 2**20 + 123, dtype=np.uint8).tobytes()  # > 5 MiB: a resumable upload
    with fs.atomic_open(target, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        assert not fs.location(target).exists() and objects(gcs_bucket) == {}  # half written: nothing in the bucket
        f.write(data[len(data) // 2:])
        assert not fs.location(target).exists()
    assert fs.location(target).read_bytes() == data
    assert list(objects(gcs_bucket)) == ["out/big.bin"]

    # a writer that fails half way leaves nothing, not even a temporary name
    with pytest.raises(RuntimeError, match="killed"):
        with fs.atomic_open(f"{folder}/half.bin", "wb") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError, match="killed"):
        with fs.atomic_target(f"{folder}/half.wav") as tmp:
            tmp.write_bytes(b"RIFF")  # a library writing by file name
            raise RuntimeError("killed")
    assert list(objects(gcs_bucket)) == ["out/big.bin"]
    assert fs.remove_temporaries(folder) == []

    # atomic_target (by file name), atomic_write_bytes and atomic_write_table (one upload each)
    with fs.atomic_target(f"{folder}/tone.wav") as tmp:
        sf.write(tmp, np.zeros(1600, np.float32), 16000, subtype="PCM_16")
        assert not fs.location(f"{folder}/tone.wav").exists()
    assert sf.info(io.BytesIO(fs.location(f"{folder}/tone.wav").read_bytes())).frames == 1600
    table = pa.table({T.CLIP_ID: ["a", "b"], "x": [1.5, 2.5]})
    fs.atomic_write_table(table, f"{folder}/t.parquet")
    assert fs.read_table(f"{folder}/t.parquet").equals(table)
    assert fs.location(f"{folder}/t.parquet").read_bytes() == fs.table_bytes(table)
    fs.atomic_write_text(f"{folder}/note.txt", "héllo\n")
    assert fs.location(f"{folder}/note.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(objects(folder)) == ["big.bin", "note.txt", "t.parquet", "tone.wav"]


def test_size_mtime_and_digest_of_an_object_are_those_of_its_bytes(gcs_bucket, tmp_path):
    data = tone_wav(0)
    local = tmp_path / "tone.wav"
    local.write_bytes(data)
    url = f"{gcs_bucket}/audio/tone.wav"
    t0 = time.time_ns()
    fs.atomic_write_bytes(url, data)
    size, mtime = fs.size_and_mtime(url)
    assert size == len(data) == fs.size_and_mtime(local)[0]
    assert mtime is not None and abs(mtime - t0) < 60 * 10**9  # the object's `updated` time, in ns
    assert fs.file_digest(url) == fs.file_digest(local) == hashlib.blake2b(data, digest_size=16).hexdigest()
    assert fs.sha256_file(url) == hashlib.sha256(data).hexdigest()
    with fs.local_file(url) as path:
        assert open(path, "rb").read() == data

    # replaced with other bytes: a new digest and stamp; the folder is not a file
    stamp = fs.stamp(f"{gcs_bucket}/audio")
    time.sleep(0.01)
    fs.atomic_write_bytes(url, data[:-2] + b"\x01\x02")
    assert fs.file_digest(url) != fs.file_digest(local)
    assert fs.size_and_mtime(url)[1] > mtime
    assert fs.stamp(f"{gcs_bucket}/audio") != stamp
    with pytest.raises(IsADirectoryError):
        fs.size_and_mtime(f"{gcs_bucket}/audio")
    with pytest.raises(FileNotFoundError):
        fs.size_and_mtime(f"{gcs_bucket}/audio/gone.wav")


def test_a_missing_bucket_is_one_line_naming_the_url_before_any_work(gcs_bucket):
    bucket = "no-such-bucket-mosaiq"
    with pytest.raises(FileNotFoundError) as e:
        fs.check_reachable(f"gs://{bucket}/out", "score output")
    assert str(e.value) == f"score output 'gs://{bucket}/out': bucket '{bucket}' does not exist"
    with pytest.raises(FileNotFoundError, match=rf"'gs://{bucket}/out'.*bucket '{bucket}' does not exist"):
        with fs.stage_output("score", f"{gcs_bucket}/clips", f"gs://{bucket}/out"):
            pytest.fail("the block must not run")
    with pytest.raises(FileNotFoundError, match=rf"ingest input 'gs://{bucket}/audio'"):
        ingest.main(ingest.IngestConfig(), f"gs://{bucket}/audio", f"{gcs_bucket}/clips", progress=False)
    assert objects(gcs_bucket) == {}  # nothing was written
    fs.check_reachable(f"{gcs_bucket}/anything", "score output")  # an existing bucket, empty: fine


def test_stage_marker_and_lock_in_a_bucket(gcs_bucket):
    with fs.stage_output("score", f"{gcs_bucket}/clips", f"{gcs_bucket}/scores") as out:
        held = json.loads((out / fs.LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert sorted(objects(f"{gcs_bucket}/scores")) == [fs.MARKER_FILE]  # the lock is gone
    marker = json.loads(fs.location(f"{gcs_bucket}/scores/{fs.MARKER_FILE}").read_text())
    assert marker == {"stage": "score", "input": f"{gcs_bucket}/clips"}
    with pytest.raises(fs.FolderError, match="holds the output of stage 'score'"):
        with fs.stage_output("analyze", f"{gcs_bucket}/clips", f"{gcs_bucket}/scores"):
            pass


def test_the_emulator_endpoint_goes_with_tasks_and_pickled_filesystems(gcs_server, gcs_bucket, monkeypatch):
    """A process started without STORAGE_EMULATOR_HOST (a Ray worker on another node) still
    opens the emulator: the variable is in the state every task gets, and the filesystem that
    Ray Data's read tasks get pickled names the endpoint itself."""
    import pickle

    url = f"{gcs_bucket}/t/part-00000.parquet"
    table = pa.table({T.CLIP_ID: ["a"]})
    fs.atomic_write_table(table, url)
    state = fs.storage_state()
    assert state["env"]["STORAGE_EMULATOR_HOST"] == gcs_server
    assert state["options"]["gs"]["token"] == "anon"
    arrow_fs, path = fs.arrow_filesystem(url)
    shipped = pickle.dumps(arrow_fs)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    with pickle.loads(shipped).open_input_file(path) as f:
        assert pq.read_table(f).equals(table)
    fs.use_storage_state(state)  # what a task does first
    assert os.environ["STORAGE_EMULATOR_HOST"] == gcs_server
    assert fs.read_table(url).equals(table)


# --- one stage on the embedded Ray, everything in the bucket ---------------------------------


@pytest.mark.slow
def test_ingest_and_analyze_on_ray_in_a_bucket_account_for_every_row_and_resume(ray_session, gcs_bucket):
    # ray_session first: Ray's workers were started before STORAGE_EMULATOR_HOST was set, as on a
    # cluster whose nodes know nothing of the store; what they need comes with each task
    urls = upload_wavs(gcs_bucket, "audio", 3)
    fs.atomic_write_bytes(f"{gcs_bucket}/audio/broken.wav", b"RIFF....WAVEfmt nonsense")
    fs.atomic_write_text(f"{gcs_bucket}/audio/manifest.csv",
                         "path,caption\n" + "".join(f"{u.rsplit('/', 1)[1]},tone {i}\n" for i, u in enumerate(urls))
                         + "broken.wav,broken\ngone.wav,missing\n")
    cfg = ingest.IngestConfig(clip_seconds=2.0, min_seconds=0.5, rows_per_part=3)
    clips_url, facts_url = f"{gcs_bucket}/clips", f"{gcs_bucket}/facts"
    report = ingest.main(cfg, f"{gcs_bucket}/audio/manifest.csv", clips_url, progress=False)
    clips = backend.read_folder(clips_url)
    assert report.status_counts == {T.OK: 6, T.ERROR: 2}  # 2 clips of each 3 s tone; 2 bad files
    assert clips.num_rows == 8 and len(fs.list_parts(clips_url)) == 3
    assert sorted(set(clips.column(T.AUDIO_PATH).to_pylist())) == sorted(
        urls + [f"{gcs_bucket}/audio/broken.wav", f"{gcs_bucket}/audio/gone.wav"])
    assert all(m for m, s in zip(clips.column(T.SOURCE_MTIME_NS).to_pylist(), clips.column(T.STATUS).to_pylist()) if s == T.OK)

    from pipeline import analyze

    report = analyze.main(analyze.AnalyzeConfig(), clips_url, facts_url)
    facts = backend.read_folder(facts_url)
    assert report.parts_total == 3 and report.parts_skipped == 0 and report.rows_written == 8
    # every input row is exactly one output row, with a status; the bad files stay error rows
    assert sorted(facts.column(T.CLIP_ID).to_pylist()) == sorted(clips.column(T.CLIP_ID).to_pylist())
    assert len(set(facts.column(T.CLIP_ID).to_pylist())) == 8
    status = dict(zip(facts.column(T.CLIP_ID).to_pylist(), facts.column(T.STATUS).to_pylist()))
    assert set(status.values()) <= {T.OK, T.ERROR, T.REJECTED} and all(status.values())
    assert status == dict(zip(clips.column(T.CLIP_ID).to_pylist(), clips.column(T.STATUS).to_pylist()))
    ok = [r for r in facts.to_pylist() if r[T.STATUS] == T.OK]
    assert len(ok) == 6 and all(r[F.FACT_NAMES[0]] is not None for r in ok)  # measured on the audio in the bucket
    files = objects(facts_url)
    assert not any(k.startswith(backend.WORK_DIR) or k == fs.LOCK_FILE for k in files), sorted(files)

    # run again: every part is found done by listing the bucket; nothing is uploaded again
    before = {k: v["generation"] for k, v in files.items() if k.endswith(".parquet")}
    again = analyze.main(analyze.AnalyzeConfig(), clips_url, facts_url)
    assert again.parts_total == again.parts_skipped == 3 and again.rows_written == 0
    assert {k: v["generation"] for k, v in objects(facts_url).items() if k.endswith(".parquet")} == before
