"""verify: a clean export passes; each kind of damage is found and named.

The clean export runs its shard tasks in this process (no Ray: `backend.run_tasks` replaced by
a loop), so these tests are in the fast set; tests/pipeline/test_export.py runs export on Ray."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import backend, fs
from pipeline import verify as V
from schemas import shard as S
from schemas import tables as T


@pytest.fixture(scope="module")
def clean(tmp_path_factory, make_captions, export_to, in_process_tasks):
    root = tmp_path_factory.mktemp("verify")
    out = root / "shards"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "run_tasks", in_process_tasks)
        export_to(make_captions(root, n_ok=8), out)
    return out


@pytest.fixture
def shards(clean, tmp_path):
    """A fresh copy of the clean export to damage."""
    out = tmp_path / "shards"
    shutil.copytree(clean, out)
    return out


def rewrite(path: Path, edit) -> None:
    """Rewrite a tar; `edit(name, data)` returns a list of (name, data) to write instead."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            for new_name, new_data in edit(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tar.addfile(info, io.BytesIO(new_data))
    path.write_bytes(buf.getvalue())


def problems(folder: Path) -> list[str]:
    return V.main(V.VerifyConfig(shards_dir=str(folder))).problems


def first_key(shard: Path) -> str:
    with tarfile.open(shard) as tar:
        return tar.getnames()[0].split(".")[0]


def test_clean_export_verifies(clean, capsys):
    assert problems(clean) == []
    assert V.cli([str(clean)]) == 0
    assert "OK: 3 shard(s), 8 sample(s)" in capsys.readouterr().out


def test_truncated_shard(shards, capsys):
    path = shards / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    found = problems(shards)
    assert any("shard-000001.tar: truncated" in p for p in found), found
    assert V.cli([str(shards)]) == 1
    assert "truncated" in capsys.readouterr().out


def test_shard_cut_at_a_member_boundary(shards):
    """Losing whole trailing samples plus the end blocks is still a truncation."""
    path = shards / "shard-000000.tar"
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-2]  # the last sample's flac
    path.write_bytes(path.read_bytes()[: last.offset])
    found = problems(shards)
    assert any("shard-000000.tar: truncated" in p for p in found), found
    assert any("complete sample(s), sizes.json says 3" in p for p in found), found


def test_corrupt_header_mid_shard(shards):
    """tarfile stops at a bad header without an error; verify must not stop with it."""
    path = shards / "shard-000000.tar"
    with tarfile.open(path) as tar:
        second = tar.getmembers()[2]  # the header of the second sample's flac
    data = bytearray(path.read_bytes())
    data[second.offset: second.offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    found = problems(shards)
    assert any("shard-000000.tar: corrupt" in p for p in found), found


def test_sample_without_json(shards):
    path = shards / "shard-000002.tar"
    key = first_key(path)
    rewrite(path, lambda n, d: [] if n == f"{key}.{S.JSON_EXT}" else [(n, d)])
    found = problems(shards)
    assert f"shard-000002.tar: sample {key!r} has no .json member" in found
    assert any(f"clip {key!r}" in p and "in no shard" in p for p in found)


def test_json_field_of_the_wrong_type(shards):
    path = shards / "shard-000000.tar"
    key = first_key(path)

    def edit(name, data):
        if name == f"{key}.{S.JSON_EXT}":
            obj = json.loads(data)
            obj[S.QUALITY_LEVEL] = str(obj[S.QUALITY_LEVEL])
            data = json.dumps(obj).encode()
        return [(name, data)]

    rewrite(path, edit)
    found = problems(shards)
    assert any(f"sample {key!r}: field 'quality_level' is str" in p for p in found), found


def test_count_disagrees_with_sizes_json(shards):
    sizes = json.loads((shards / S.SIZES_FILE).read_text())
    sizes["shard-000001.tar"] += 1
    (shards / S.SIZES_FILE).write_text(json.dumps(sizes))
    assert problems(shards) == ["shard-000001.tar: 3 complete sample(s), sizes.json says 4"]


def test_audio_length_or_rate_differs_from_json(shards):
    path = shards / "shard-000000.tar"
    key = first_key(path)

    def edit(name, data):
        if name == f"{key}.{S.JSON_EXT}":
            obj = json.loads(data)
            obj[S.SECONDS_TOTAL] = obj[S.SECONDS_TOTAL] * 2
            obj[S.SAMPLE_RATE] = 48000
            data = json.dumps(obj).encode()
        return [(name, data)]

    rewrite(path, edit)
    found = problems(shards)
    assert any(f"sample {key!r}: audio is" in p and "JSON says 48000 Hz" in p for p in found), found
    assert any(f"sample {key!r}: audio has" in p and "frames, JSON declares" in p for p in found), found


def test_unsafe_member_names_are_refused(shards):
    path = shards / "shard-000000.tar"
    key = first_key(path)
    rewrite(path, lambda n, d: [(n, d)] + ([("../evil.json", b"{}"), ("a/b.flac", b"x"), ("x.y.json", b"{}")] if n.startswith(key) and n.endswith("json") else []))
    found = problems(shards)
    assert any("refused member name '../evil.json'" in p for p in found), found
    assert any("refused member name 'a/b.flac'" in p for p in found), found
    assert any("member 'x.y.json' is not <key>" in p for p in found), found
    assert not (shards.parent / "evil.json").exists()


def test_checksum_index_and_leftovers(shards):
    # a shard whose bytes changed but still reads: only the checksum can tell
    (shards / f".shard-000001.tar{fs.TMP_MARK}77").write_bytes(b"")
    index = pq.read_table(shards / S.INDEX_FILE)
    pos = index.column(S.POSITION).to_pylist()
    pos[0] += 1
    pq.write_table(index.set_column(index.schema.get_field_index(S.POSITION), S.POSITION, pa.array(pos, pa.int32())), shards / S.INDEX_FILE)
    sums = (shards / S.CHECKSUMS_FILE).read_text().replace("shard-000002.tar", "shard-000009.tar")
    (shards / S.CHECKSUMS_FILE).write_text(sums)
    found = problems(shards)
    clip = index.column(T.CLIP_ID)[0].as_py()
    assert f"temporary file .shard-000001.tar{fs.TMP_MARK}77 of an interrupted run is left" in found
    assert any(f"clip {clip!r} is at" in p for p in found), found
    assert "shard-000002.tar has no line in SHA256SUMS" in found
    assert "shard-000009.tar is in SHA256SUMS but missing" in found


def test_missing_shard_and_extra_shard(shards):
    (shards / "shard-000002.tar").rename(shards / "shard-000007.tar")
    found = problems(shards)
    assert "shard-000002.tar is in sizes.json but missing" in found
    assert "shard-000007.tar is not in sizes.json" in found


def test_missing_folder_is_a_usage_error(tmp_path, capsys):
    assert V.cli([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_as_a_curate_stage(clean, shards):
    """`main(cfg, input_dir, output_dir)`: a StageReport for curate; problems stop the run."""
    report = V.main(V.VerifyConfig(), str(clean), str(clean))
    assert report.stage == "verify" and report.ok and report.parts_total == 3
    assert report.detail == "8 sample(s) in 3 shard(s): ok" and report.line().endswith(": ok")
    (shards / "shard-000001.tar").unlink()
    with pytest.raises(V.VerifyError, match="problem"):
        V.main(V.VerifyConfig(), str(shards), str(shards))
    with pytest.raises(FileNotFoundError):
        V.main(V.VerifyConfig())  # no folder named
