"""`mosaiq verify` on folders `mosaiq encode` wrote: index.parquet and SHA256SUMS as export's,
every latent and text-state member checked, the sample that is wrong named, an unfinished run
refused, and a resumed run leaving the index files byte-identical."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model import preencoded as P
from model.data import read_shard
from model.encode import main as encode
from pipeline import fs
from pipeline.verify import cli as verify_cli
from pipeline.verify import verify_folder
from schemas import shard as S
from tests.model.test_encode import _encode_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INDEX_FILES = (S.SIZES_FILE, S.INDEX_FILE, S.CHECKSUMS_FILE)


@pytest.fixture(scope="module")
def encoded_clean(tmp_path_factory, text_encoder_dir, shard_writer):
    """Export's shards (6 samples in 2 shards, index files and all) and their encoding."""
    root = tmp_path_factory.mktemp("encv")
    shard_writer(root / "shards", n=6, seed=4)
    encode(_encode_cfg(text_encoder_dir), root / "shards", root / "encoded", local=True)
    return root / "encoded"


@pytest.fixture
def work_copy(encoded_clean, tmp_path) -> Path:
    """A work_copy of the encoded folder for a test to damage."""
    return Path(shutil.copytree(encoded_clean, tmp_path / "encoded"))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _replace_member(shard: Path, name: str, data: bytes) -> None:
    """Rewrite `shard` with member `name` holding `data` (every other member as it was, in order)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    assert name in [m.name for m, _ in members]
    with tarfile.open(shard, "w") as tar:
        for m, old in members:
            new = data if m.name == name else old
            m.size = len(new)
            tar.addfile(m, io.BytesIO(new))


def _second_sample(folder: Path) -> tuple[Path, str]:
    shard = sorted(folder.glob(f"*{S.SHARD_EXT}"))[0]
    return shard, [key for key, _, _ in read_shard(str(shard), 1 << 26)][1]


def test_verify_passes_on_encode_output_and_its_index_matches_the_shards(encoded_clean, capsys):
    result = verify_folder(encoded_clean)
    assert result.problems == [] and result.shards == 2 and result.samples == 6
    index = fs.read_table(encoded_clean / S.INDEX_FILE)
    assert index.schema.equals(S.INDEX_SCHEMA, check_metadata=True)
    rows = list(zip(*(index.column(c).to_pylist() for c in S.INDEX_SCHEMA.names)))
    in_tar = [(key, p.name, pos) for p in sorted(encoded_clean.glob("*.tar"))
              for pos, (key, _, _) in enumerate(read_shard(str(p), 1 << 26))]
    assert rows == in_tar
    sums = (encoded_clean / S.CHECKSUMS_FILE).read_text().splitlines()
    assert sums == [f"{fs.sha256_file(p)}  {p.name}" for p in sorted(encoded_clean.glob("*.tar"))]
    assert verify_cli([str(encoded_clean)]) == 0
    assert "OK: 2 shard(s), 6 sample(s)" in capsys.readouterr().out


def test_resumed_encode_leaves_index_files_byte_identical(encoded_clean, text_encoder_dir):
    before = {n: ((encoded_clean / n).read_bytes(), (encoded_clean / n).stat().st_mtime_ns) for n in INDEX_FILES}
    again = encode(_encode_cfg(text_encoder_dir), encoded_clean.parent / "shards", encoded_clean, local=True)
    assert again["shards_skipped"] == again["shards"] == 2
    # same bytes, and not even rewritten
    assert {n: ((encoded_clean / n).read_bytes(), (encoded_clean / n).stat().st_mtime_ns) for n in INDEX_FILES} == before


@pytest.mark.parametrize("ext, arr_or_bytes, says", [
    (S.LATENT_EXT, np.zeros((1, 64, 64), np.float32), r"\.latent\.npy has shape \(1, 64, 64\) "
                                                      r"float32; the folder's other samples have shape \(1, 128, 64\) float32 \(5 of 6\)"),
    (S.LATENT_EXT, np.zeros((1, 128, 64), np.float16), r"\.latent\.npy has shape \(1, 128, 64\) float16; .* float32 \(5 of 6\)"),
    (S.LATENT_EXT, b"\x93NUMPY garbage, not an array", r"\.latent\.npy does not load as a \.npy array"),
    (S.LATENT_EXT, np.full((1, 128, 64), np.nan, np.float32), r"\.latent\.npy has non-finite values"),
    (S.LATENT_EXT, np.zeros((128, 64), np.float32), r"\.latent\.npy has shape \(128, 64\), expected 3 non-empty dimensions"),
    (S.TEXT_EXT, np.zeros((3, 32), np.int64), r"\.text\.npy holds int64, not a float array"),
    (S.TEXT_EXT, np.zeros((3, 16), np.float32), r"\.text\.npy has shape \(3, 16\) float32; the folder's "
                                               r"other samples have width 32 float32 \(5 of 6\)"),
])
def test_verify_names_the_sample_whose_member_is_wrong(work_copy, ext, arr_or_bytes, says):
    shard, key = _second_sample(work_copy)
    data = arr_or_bytes if isinstance(arr_or_bytes, bytes) else _npy(arr_or_bytes)
    _replace_member(shard, f"{key}.{ext}", data)
    problems = verify_folder(work_copy).problems
    named = [p for p in problems if p.startswith(f"{shard.name}: sample {key!r}: ")]
    assert len(named) == 1, problems
    assert re.search(says, named[0]), named[0]
    # the only other problem: the rewritten shard's bytes are not the recorded ones
    assert [p for p in problems if p not in named] == [
        f"{shard.name}: sha256 {fs.sha256_file(shard)} differs from {S.CHECKSUMS_FILE} ({_recorded_sha(work_copy, shard.name)})"]


def _recorded_sha(folder: Path, name: str) -> str:
    return dict(reversed(line.split("  ")) for line in (folder / S.CHECKSUMS_FILE).read_text().splitlines())[name]


def test_verify_reports_a_missing_pre_encoded_member(work_copy):
    shard, key = _second_sample(work_copy)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar if m.name != f"{key}.{S.TEXT_EXT}"]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    assert f"{shard.name}: sample {key!r} has no .{S.TEXT_EXT} member" in verify_folder(work_copy).problems


def test_verify_reports_a_checksum_mismatch(work_copy):
    name = sorted(work_copy.glob("*.tar"))[1].name
    lines = (work_copy / S.CHECKSUMS_FILE).read_text().splitlines()
    wrong = "0" * 64
    (work_copy / S.CHECKSUMS_FILE).write_text("".join(f"{wrong}  {name}\n" if line.endswith(f"  {name}") else line + "\n"
                                                 for line in lines))
    assert verify_folder(work_copy).problems == [f"{name}: sha256 {fs.sha256_file(work_copy / name)} differs from {S.CHECKSUMS_FILE} ({wrong})"]


def test_verify_refuses_an_unfinished_encode(work_copy):
    info = json.loads((work_copy / P.INFO_FILE).read_text())
    (work_copy / P.INFO_FILE).write_text(json.dumps({**info, P.COMPLETE: False}))
    problems = verify_folder(work_copy).problems
    assert len(problems) == 1 and "encode run did not finish" in problems[0], problems
    assert verify_cli([str(work_copy)]) == 1
