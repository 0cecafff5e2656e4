"""The trainer and `mosaiq encode` on object storage: shards listed and streamed from an `s3://`
folder, checkpoints written to and resumed from a bucket, encode from and to a bucket, all
against a real S3 server (moto's server mode on 127.0.0.1, tests/conftest.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model import checkpoint as ckpt
from model import preencoded as P
from model.data import DataConfig, list_shards, make_loader, pre_encoded_info, read_shard, shards_folder
from model.encode import EncodeConfig, main as encode
from model.text import TextEncoderConfig
from model.train import CHECKPOINT_DIR, RESOLVED_CONFIG, SAMPLES_DIR, main as train
from pipeline import fs
from pipeline.verify import verify_folder
from schemas import shard as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_S = 1.28
STATS = '{"mu": 3.8, "sigma": 0.2}'


def upload_folder(local: Path, url: str) -> None:
    """Every file of `local` (not recursive) to `url/<name>`, through the fs layer."""
    for p in sorted(local.iterdir()):
        if p.is_file():
            fs.atomic_write_bytes(f"{url}/{p.name}", p.read_bytes())


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory, shard_writer) -> Path:
    """8 samples in 2 export-style shards, with a quality-stats JSON beside them."""
    d = tmp_path_factory.mktemp("s3shards") / "shards"
    shard_writer(d, n=8, seed=5)
    (d / "quality_stats.json").write_text(STATS)
    return d


@pytest.fixture
def bucket_shards(local_shards, s3_bucket) -> str:
    url = f"{s3_bucket}/shards"
    upload_folder(local_shards, url)
    return url


def _batches(shards: str, n: int, **kw) -> list[dict]:
    loader = make_loader(DataConfig(shards=shards, clip_seconds=CLIP_S, batch_size=3, shuffle_buffer=4, **kw), seed=1)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_shards_are_listed_and_streamed_from_a_bucket(local_shards, bucket_shards):
    names = sorted(p.name for p in local_shards.glob("*.tar"))
    assert list_shards(bucket_shards) == [f"{bucket_shards}/{n}" for n in names]
    assert list_shards(bucket_shards + "/") == list_shards(bucket_shards)
    brace = f"{bucket_shards}/shard-{{000000..000001}}.tar"
    assert list_shards(brace) == list_shards(bucket_shards)
    with pytest.raises(FileNotFoundError, match=r"shard-000002\.tar.*1 missing"):
        list_shards(f"{bucket_shards}/shard-{{000000..000002}}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-here' .* does not exist"):
        list_shards(f"{bucket_shards}/nothing-here")
    fs.atomic_write_text(bucket_shards.replace("/shards", "/notes/a.json"), "{}")
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        list_shards(bucket_shards.replace("/shards", "/notes"))
    assert str(shards_folder(brace)) == bucket_shards
    # the same samples, member for member, as from the local copy
    for name in names:
        assert list(read_shard(f"{bucket_shards}/{name}", 1 << 26)) == list(read_shard(str(local_shards / name), 1 << 26))
    # a shard cut short in the bucket is reported by the stream as it is on disk
    cut = f"{bucket_shards.rsplit('/', 1)[0]}/cut/{names[0]}"
    fs.atomic_write_bytes(cut, (local_shards / names[0]).read_bytes()[:3000])
    _, _, problems = list(read_shard(cut, 1 << 26))[-1]
    assert any("cut short or corrupt" in p for p in problems)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_from_a_bucket_match_the_local_ones(local_shards, bucket_shards, workers):
    got = _batches(bucket_shards, 4, num_workers=workers)  # 2 workers: fsspec used in forked loader processes
    want = _batches(str(local_shards), 4, num_workers=workers)
    for g, w in zip(got, want):
        assert g["prompts"] == w["prompts"]
        torch.testing.assert_close(g["audio"], w["audio"], rtol=0, atol=0)


@pytest.mark.slow
def test_train_to_a_bucket_resumes_exactly(local_shards, bucket_shards, text_encoder_dir, tiny_train_config, tmp_path):
    """Shards, checkpoints and samples in the bucket: a run stopped at step 5 and resumed from
    its checkpoint there gives the losses and weights of one uninterrupted run on local disk."""
    kw = dict(checkpoint_every=4, keep_checkpoints=2, sample_every=8, sample_prompts=["high quality, a tone"], sample_steps=2)
    full = train(tiny_train_config(str(local_shards), text_encoder_dir, str(tmp_path / "local"), max_steps=8, **kw))
    run = f"{bucket_shards.rsplit('/', 1)[0]}/train"
    first = train(tiny_train_config(bucket_shards, text_encoder_dir, run, max_steps=5, **kw))
    assert first["checkpoint"] == f"{run}/{CHECKPOINT_DIR}/{ckpt.checkpoint_name(5)}"
    assert first["losses"] == pytest.approx(full["losses"][:5], rel=1e-6, abs=1e-7)
    second = train(tiny_train_config(bucket_shards, text_encoder_dir, run, max_steps=8, **kw))
    assert len(second["losses"]) == 3  # resumed from step 5, read from the bucket
    assert second["losses"] == pytest.approx(full["losses"][5:], rel=1e-6, abs=1e-7)
    # older checkpoints pruned in the bucket too; the newest loads by URL
    assert [p.name for p in ckpt.list_checkpoints(f"{run}/{CHECKPOINT_DIR}")] == [ckpt.checkpoint_name(s) for s in (5, 8)]
    a, b = ckpt.read_group(full["checkpoint"], "ema"), ckpt.read_group(second["checkpoint"], "ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    meta = ckpt.read_metadata(second["checkpoint"])
    assert meta[ckpt.QUALITY_STATS] == {"quality_stats.json": json.loads(STATS)}  # read beside the shards in the bucket
    assert meta[ckpt.TRAIN_CONFIG]["data"]["shards"] == bucket_shards
    assert json.loads(fs.location(f"{run}/{RESOLVED_CONFIG}").read_text())["output_dir"] == run
    wav = f"{run}/{SAMPLES_DIR}/step-000000008_0.wav"
    assert fs.location(wav).read_bytes() == (tmp_path / "local" / SAMPLES_DIR / "step-000000008_0.wav").read_bytes()
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()  # no URL taken for a local path


def test_train_names_a_missing_bucket_before_any_work(local_shards, text_encoder_dir, tiny_train_config, s3_server):
    cfg = tiny_train_config(str(local_shards), text_encoder_dir, "s3://no-such-bucket-mosaiq/run", max_steps=1)
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket-mosaiq' does not exist"):
        train(cfg)


def _encode_cfg(text_dir: str) -> EncodeConfig:
    return EncodeConfig(text=TextEncoderConfig(path=text_dir), clip_seconds=CLIP_S, batch_size=3)


def _tars(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in fs.location(folder).glob("*.tar")}


@pytest.mark.slow
def test_encode_from_and_to_a_bucket(local_shards, bucket_shards, text_encoder_dir, tiny_train_config, tmp_path):
    """The same bytes as an encode on local disk (index files too), verified in the bucket; a
    re-run skips every shard; the trainer finds the bucket's encode_info.json and trains on the
    latents there."""
    ref = encode(_encode_cfg(text_encoder_dir), local_shards, tmp_path / "encoded", local=True)
    out = f"{bucket_shards.rsplit('/', 1)[0]}/encoded"
    report = encode(_encode_cfg(text_encoder_dir), bucket_shards, out, local=True)
    assert report["samples"] == ref["samples"] == 8 and report["input"] == bucket_shards
    assert _tars(out) == _tars(tmp_path / "encoded")  # same inputs, same bytes
    for name in (P.EMPTY_TEXT_FILE, S.SIZES_FILE, S.INDEX_FILE, S.CHECKSUMS_FILE, "quality_stats.json"):
        assert fs.location(f"{out}/{name}").read_bytes() == (tmp_path / "encoded" / name).read_bytes()
    # `mosaiq verify` reads the encoded bucket folder (the fixture's stand-in stats JSON aside)
    assert [p for p in verify_folder(out).problems if not p.startswith("quality_stats.json: ")] == []
    names = sorted(p.name for p in fs.location(f"{out}/{P.STATE_DIR}").iterdir())
    assert names == sorted(f"{n}.json" for n in _tars(out))
    again = encode(_encode_cfg(text_encoder_dir), bucket_shards, out, local=True)
    assert again["shards_skipped"] == again["shards"] == 2
    # the trainer reads the pre-encoded shards from the bucket
    cfg = tiny_train_config(out, text_encoder_dir, str(tmp_path / "run"), max_steps=2, data={"pre_encoded": True})
    info = pre_encoded_info(cfg.data)
    assert info is not None and info["complete"] and info["latent_shape"] == [1, 128, 64]
    result = train(cfg)
    assert ckpt.read_metadata(result["checkpoint"])[ckpt.PRE_ENCODED]["input"] == bucket_shards


@pytest.mark.slow
def test_ray_train_reads_and_writes_a_bucket(bucket_shards, text_encoder_dir, tiny_train_config, ray_session):
    """Two Ray Train workers stream the shards from the bucket; rank 0's checkpoints and Ray
    Train's own run state go there too (its workers get the storage settings as environment)."""
    run = f"{bucket_shards.rsplit('/', 1)[0]}/ray_run"
    cfg = tiny_train_config(bucket_shards, text_encoder_dir, run, max_steps=3, log_every=1, ray_workers=2,
                            data={"batch_size": 2, "num_workers": 0})
    result = train(cfg)
    assert result["checkpoint"] == f"{run}/{CHECKPOINT_DIR}/{ckpt.checkpoint_name(3)}"
    assert ckpt.read_metadata(result["checkpoint"])[ckpt.TRAIN_STATE] == {"step": 3, "world_size": 2, "samples_seen": 12}
    assert fs.location(f"{run}/ray").is_dir()
