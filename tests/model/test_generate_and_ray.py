"""`generate` end to end from a trained checkpoint, and a two-worker Ray Train run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import soundfile as sf

from model import checkpoint as ckpt
from model.generate import GenerateConfig, cli as generate_cli, main as generate
from model.train import main as train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shard_dir, text_encoder_dir, tiny_train_config):
    out = tmp_path_factory.mktemp("gen_run")
    return train(tiny_train_config(shard_dir, text_encoder_dir, str(out), max_steps=20))


@pytest.mark.slow
def test_generate_writes_finite_nonsilent_wav(trained, tmp_path):
    out = tmp_path / "x.wav"
    paths = generate(GenerateConfig(checkpoint=trained["checkpoint"], prompts=("high quality, a tone at 440 hertz",),
                                    quality=5, out=str(out), seconds=1.0, ddim_steps=5, seed=0))
    assert paths == [out]
    wave, sr = sf.read(str(out))
    assert sr == 16000 and wave.shape == (16000,)
    assert np.isfinite(wave).all() and np.abs(wave).max() > 1e-3


@pytest.mark.slow
def test_generate_cli_batched_and_seeded(trained, tmp_path):
    args = ["--checkpoint", trained["checkpoint"], "--prompt", "a tone", "--prompt", "low quality, a tone",
            "--num-per-prompt", "2", "--batch-size", "3", "--steps", "3", "--seconds", "0.5", "--seed", "7"]
    assert generate_cli(args + ["--out", str(tmp_path / "a.wav")]) == 0
    assert generate_cli(args + ["--out", str(tmp_path / "b.wav")]) == 0
    for i in range(4):
        a, _ = sf.read(str(tmp_path / f"a_{i:03d}.wav"))
        b, _ = sf.read(str(tmp_path / f"b_{i:03d}.wav"))
        assert a.shape == (8000,) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="quality must be 1..5, got 9"):
        GenerateConfig(checkpoint="x", prompts=("p",), quality=9)


@pytest.mark.slow
def test_two_worker_ray_train(tmp_path, shard_dir, text_encoder_dir, tiny_train_config, ray_session):
    cfg = tiny_train_config(shard_dir, text_encoder_dir, str(tmp_path / "ray_run"), max_steps=3, log_every=1,
                            ray_workers=2, data={"batch_size": 2, "num_workers": 0})
    result = train(cfg)
    assert result["step"] == 3
    assert ckpt.read_metadata(result["checkpoint"])[ckpt.TRAIN_STATE] == {"step": 3, "world_size": 2, "samples_seen": 12}
