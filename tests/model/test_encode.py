"""mosaiq encode: the pre-encoded layout, resume, samples left out with reasons, and the trainer
reading pre-encoded shards (same losses as from audio, no encoder per step, mismatches refused)."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.config import from_dict
from model import checkpoint as ckpt
from model import preencoded as P
from model.data import decode_audio, read_shard
from model.encode import EncodeConfig, cli, main as encode
from model.representation import MelConfig, Representation, RepresentationConfig
from model.text import FrozenTextEncoder, TextEncoderConfig
from model.train import main as train
from schemas import shard as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_S = 1.28


def _encode_cfg(text_dir: str, **kw) -> EncodeConfig:
    return EncodeConfig(text=TextEncoderConfig(path=text_dir), clip_seconds=CLIP_S, batch_size=3, **kw)


def _add_bad_shard(folder: Path) -> None:
    """A shard with one good sample (copied from the first shard) and one whose audio is not FLAC."""
    key, members, _ = next(read_shard(sorted(str(p) for p in folder.glob("*.tar"))[0], 1 << 26))
    with tarfile.open(folder / "shard-999999.tar", "w") as tar:
        for name, data in [(f"good0.{S.AUDIO_EXT}", members[S.AUDIO_EXT]), (f"good0.{S.JSON_EXT}", members[S.JSON_EXT]),
                           (f"bad0.{S.AUDIO_EXT}", b"RIFF not flac at all"), (f"bad0.{S.JSON_EXT}", members[S.JSON_EXT])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, text_encoder_dir, shard_writer):
    """Export-style shards (6 samples, 2 shards, plus one shard with a bad sample) and their encoding."""
    root = tmp_path_factory.mktemp("enc")
    shard_writer(root / "shards", n=6, seed=3)
    (root / "shards" / "quality_stats.json").write_text('{"mu": 3.8, "sigma": 0.2}')
    _add_bad_shard(root / "shards")
    # on one thread, as the tests that encode again run (one_torch_thread, set up after this
    # module fixture): a float sum split over other threads may differ in its last bits, and
    # the resume test compares bytes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = encode(_encode_cfg(text_encoder_dir), root / "shards", root / "encoded", local=True)
    finally:
        torch.set_num_threads(before)
    return root, report


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for url in sorted(str(p) for p in folder.glob("*.tar")):
        for key, members, problems in read_shard(url, 1 << 26):
            assert not problems
            out[key] = members
    return out


def test_encode_writes_latents_and_text_states(encoded, text_encoder_dir):
    root, report = encoded
    out = root / "encoded"
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in (root / "shards").glob("*.tar"))
    samples = _samples(out)
    assert len(samples) == 7 and report["samples"] == 7
    # the sample that cannot be used is left out with its reason; the run went on
    assert [(x["shard"], x["key"]) for x in report["left_out"]] == [("shard-999999.tar", "bad0")]
    assert "not a FLAC stream" in report["left_out"][0]["reason"]
    assert json.loads((out / P.REPORT_FILE).read_text())["left_out"] == report["left_out"]
    assert json.loads((out / S.SIZES_FILE).read_text())["shard-999999.tar"] == 1
    assert (out / "quality_stats.json").read_text() == '{"mu": 3.8, "sigma": 0.2}'
    info = P.read_info(out)
    assert info["complete"] and info["latent_shape"] == [1, 128, 64] and info["text_dim"] == 32
    assert info["representation"]["autoencoder"] == "identity" and info["text"]["model_type"] == "t5"
    # each sample: its flac and json unchanged, the latent of its audio, the states of its prompt
    rep = Representation(RepresentationConfig())
    text = FrozenTextEncoder(TextEncoderConfig(path=text_encoder_dir))
    for key, m in list(samples.items())[:3]:
        assert set(m) == {S.AUDIO_EXT, S.JSON_EXT, P.LATENT_EXT, P.TEXT_EXT}
        latent = np.load(io.BytesIO(m[P.LATENT_EXT]), allow_pickle=False)
        wave = torch.from_numpy(decode_audio(m[S.AUDIO_EXT], 20480, None))[None]
        np.testing.assert_allclose(latent, rep.encode(wave)[0].numpy(), rtol=1e-5, atol=1e-5)
        states = np.load(io.BytesIO(m[P.TEXT_EXT]), allow_pickle=False)
        h, mask = text([json.loads(m[S.JSON_EXT])[S.PROMPT]])
        assert states.shape == (int(mask.sum()), 32)
        np.testing.assert_allclose(states, h[0, mask[0]].numpy(), rtol=1e-5, atol=1e-5)
    empty = np.load(out / P.EMPTY_TEXT_FILE)
    np.testing.assert_allclose(empty, text([""])[0][0].numpy(), rtol=1e-5, atol=1e-5)


def test_encode_resumes_and_redoes_what_changed(encoded, text_encoder_dir):
    root, _ = encoded
    out = root / "encoded"
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = encode(_encode_cfg(text_encoder_dir), root / "shards", out, local=True)
    assert again["shards_skipped"] == again["shards"] == 3 and again["left_out"]
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    damaged = sorted(out.glob("shard-0*.tar"))[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a cut-off copy
    third = encode(_encode_cfg(text_encoder_dir), root / "shards", out, local=True)
    assert third["shards_skipped"] == 2
    assert damaged.read_bytes() == before[damaged.name]  # same inputs, same bytes


def test_encode_help_explains_the_layout(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for word in ("latent.npy", "text.npy", "encode_info.json", "encode_report.json", "--gpu", "stable-audio-tools"):
        assert word in text


def _train_cfg(tiny_train_config, shards, text_dir, out, **kw):
    return tiny_train_config(str(shards), text_dir, str(out), checkpoint_every=4, **kw)


@pytest.mark.slow
def test_training_on_encoded_shards_matches_audio_and_runs_no_encoder(encoded, text_encoder_dir, tiny_train_config,
                                                                        tmp_path, monkeypatch):
    root, _ = encoded
    ref = train(_train_cfg(tiny_train_config, root / "encoded", text_encoder_dir, tmp_path / "audio", max_steps=8,
                           data={"pre_encoded": False}))
    calls = []
    monkeypatch.setattr(FrozenTextEncoder, "forward", lambda *a: calls.append("text"))
    monkeypatch.setattr(Representation, "encode", lambda *a, **k: calls.append("rep"))
    run = _train_cfg(tiny_train_config, root / "encoded", text_encoder_dir, tmp_path / "pre", max_steps=8)
    got = train(run)
    assert calls == []  # neither the text encoder nor the representation's encoder ran
    # the same samples in the same order, the same dropped prompts: the same losses
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4, abs=1e-6)
    assert ckpt.read_metadata(got["checkpoint"])[ckpt.PRE_ENCODED]["latent_shape"] == [1, 128, 64]
    # exact resume on pre-encoded shards
    train(dataclasses.replace(run, output_dir=str(tmp_path / "resumed"), max_steps=5))
    second = train(dataclasses.replace(run, output_dir=str(tmp_path / "resumed"), max_steps=8))
    assert second["losses"] == pytest.approx(got["losses"][5:], rel=1e-6, abs=1e-7)


def test_training_refuses_shards_encoded_otherwise(encoded, text_encoder_dir, tiny_train_config, tmp_path):
    from model.text import FrozenTextEncoder  # noqa: F401 - the other encoder below is written by the fixture helper
    from tests.model.conftest import write_tiny_text_encoder

    root, _ = encoded
    other_mel = _train_cfg(tiny_train_config, root / "encoded", text_encoder_dir, tmp_path / "a", max_steps=1,
                           representation={"mel": {"norm_mean": -4.0}})
    with pytest.raises(ValueError, match=r"representation\.mel: .*config .*-4\.0"):
        train(other_mel)
    other_dir = write_tiny_text_encoder(tmp_path / "t5b")
    cfg_b = json.loads((Path(other_dir) / "config.json").read_text())
    cfg_b["d_ff"] = 48  # another encoder of the same type and width
    (Path(other_dir) / "config.json").write_text(json.dumps(cfg_b))
    with pytest.raises(ValueError, match=r"text\.files_digest"):
        train(_train_cfg(tiny_train_config, root / "encoded", other_dir, tmp_path / "b", max_steps=1))
    with pytest.raises(ValueError, match="clip_seconds"):
        train(_train_cfg(tiny_train_config, root / "encoded", text_encoder_dir, tmp_path / "c", max_steps=1,
                         data={"clip_seconds": 0.64}))
    info = json.loads((root / "encoded" / P.INFO_FILE).read_text())
    try:
        (root / "encoded" / P.INFO_FILE).write_text(json.dumps({**info, "complete": False}))
        with pytest.raises(ValueError, match="has not finished"):
            train(_train_cfg(tiny_train_config, root / "encoded", text_encoder_dir, tmp_path / "d", max_steps=1))
    finally:
        (root / "encoded" / P.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="pre_encoded is true"):
        train(_train_cfg(tiny_train_config, root / "shards", text_encoder_dir, tmp_path / "e", max_steps=1,
                         data={"pre_encoded": True}))


@pytest.mark.slow
def test_official_preset_tiny_trains_on_shards_from_encode_on_ray(tmp_path, shard_dir, text_encoder_dir):
    """jobs/train-qamdt-official.yaml at the tiny size (AudioLDM-layout VAE, normalize_wav,
    scale_by_std, Min-SNR, adaLN-single): `encode` as a Ray job, then training on its output
    with loss falling, the latent scale measured from the stored latents, and exact resume."""
    import ray

    from model.data import LATENT
    from model.encode import config_from_training  # noqa: F401 - the CLI's path from a train YAML
    from model.train import make_train_loader
    from pipeline.raycluster import init_ray
    from tests.model.test_train import _official_tiny

    cfg = _official_tiny(tmp_path, shard_dir, text_encoder_dir, str(tmp_path / "x"), max_steps=1)
    enc = EncodeConfig(representation=cfg.representation, text=cfg.text, clip_seconds=cfg.data.clip_seconds)
    init_ray(num_cpus=2)
    try:
        report = encode(enc, shard_dir, tmp_path / "encoded")
    finally:
        ray.shutdown()
    assert report["samples"] == 8 and not report["left_out"]
    assert P.read_info(tmp_path / "encoded")["latent_shape"] == [8, 32, 16]

    def official(out, steps, **kw):
        c = _official_tiny(tmp_path, str(tmp_path / "encoded"), text_encoder_dir, str(tmp_path / out), max_steps=steps, **kw)
        return dataclasses.replace(c, data=dataclasses.replace(c.data, pre_encoded=True))

    full = train(official("a", 60))
    losses = full["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    first = next(iter(make_train_loader(official("y", 1), 0, 1, 0, torch.device("cpu"))))
    scale = ckpt.read_metadata(full["checkpoint"])[ckpt.REPRESENTATION]["latent_scale"]
    assert scale == pytest.approx(1 / first[LATENT].double().std(unbiased=False).item(), rel=1e-5)
    ref = train(official("b", 12, checkpoint_every=7))
    train(official("c", 7, checkpoint_every=7))
    second = train(official("c", 12, checkpoint_every=7))
    assert second["losses"] == pytest.approx(ref["losses"][7:], rel=1e-6, abs=1e-7)


def test_loader_decodes_16k_mono_without_resampling_and_encoded_without_decoding(tmp_path, monkeypatch):
    import sys

    from model import data as D

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from train_throughput import write_shards  # shards of a chosen rate/channels, or pre-encoded ones

    def refuse(*a, **k):
        raise AssertionError("the loader resampled or decoded")

    (tmp_path / "mono").mkdir()
    write_shards(tmp_path / "mono", n=4, seconds=CLIP_S)  # as export writes with sample_rate 16000, mono
    monkeypatch.setattr(D, "resample", refuse)
    batch = next(iter(D.ShardStream(D.DataConfig(shards=str(tmp_path / "mono"), clip_seconds=CLIP_S, batch_size=4, num_workers=0), seed=0)))
    assert batch[D.AUDIO].shape == (4, 20480)
    (tmp_path / "enc").mkdir()
    write_shards(tmp_path / "enc", n=4, seconds=CLIP_S, encoded=((8, 32, 16), 5))
    monkeypatch.setattr(D, "decode_audio", refuse)
    monkeypatch.setattr(D, "audio_header", refuse)
    batch = next(iter(D.ShardStream(D.DataConfig(shards=str(tmp_path / "enc"), batch_size=4, num_workers=0), seed=0)))
    assert batch[D.LATENT].shape == (4, 8, 32, 16) and batch[D.TEXT].shape == (4, 5, 1024) and batch[D.TEXT_MASK].all()
    assert D.AUDIO not in batch
