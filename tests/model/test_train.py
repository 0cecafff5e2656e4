"""Training: the tiny preset overfits a few shard samples; resume is exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from jobs.config import from_dict
from model import checkpoint as ckpt
from model.data import AUDIO, DataConfig, make_loader
from model.diffusion import DiffusionConfig, GaussianDiffusion
from model.qamdt import QAMDTConfig, build_model
from model.representation import Representation
from model.text import FrozenTextEncoder
from model.train import TrainConfig, main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

def fixed_loss(cfg: TrainConfig, model, batch) -> float:
    """Eps-MSE of `model` on one batch at fixed timesteps and noise (no masking)."""
    rep, text = Representation(cfg.representation), FrozenTextEncoder(cfg.text)
    diff = GaussianDiffusion(cfg.diffusion)
    x0 = rep.encode(batch[AUDIO])
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for t in (50, 250, 500, 750):
        noise = torch.randn(x0.shape, generator=g)
        tt = torch.full((x0.shape[0],), t)
        y, m = text(batch["prompts"])
        with torch.no_grad():
            eps = model(diff.q_sample(x0, tt, noise), tt, batch["quality"], y, m)
        total += torch.mean((eps - noise) ** 2).item() / 4
    return total


def _load_ema(path, group="ema"):
    meta = ckpt.read_metadata(path)
    raw = dict(meta[ckpt.MODEL_CONFIG])
    model = build_model(from_dict(QAMDTConfig, raw)).eval()
    model.load_state_dict(ckpt.read_group(path, group))
    return model, meta


@pytest.mark.slow
def test_tiny_overfits_shards(tmp_path, text_encoder_dir, shard_writer, tiny_train_config):
    shard_writer(tmp_path / "shards", n=4, seed=1)
    (tmp_path / "shards" / "quality_stats.json").write_text('{"mu": 3.8, "sigma": 0.2}')
    cfg = tiny_train_config(str(tmp_path / "shards"), text_encoder_dir, str(tmp_path / "run"), max_steps=200,
                            diffusion={"uncond_prob": 0.0})
    batch = next(iter(make_loader(dataclasses.replace(cfg.data, random_crop=False), seed=0)))
    torch.manual_seed(0)
    init = build_model(_load_cfg(cfg, text_encoder_dir)).eval()
    before = fixed_loss(cfg, init, batch)
    result = main(cfg)
    model, meta = _load_ema(result["checkpoint"], "ema")
    after = fixed_loss(cfg, model, batch)
    # stated factor: the eps-MSE at fixed (t, noise) over t = 50..750 falls at least 1.5x in
    # 200 steps (measured 1.00 -> 0.56; at t = 50 the clips' noise texture must be memorised,
    # which a 0.2M-parameter model does slowly, so the floor is high)
    assert before == pytest.approx(1.0, abs=0.1)  # zero-initialised output: MSE of unit noise
    assert after < before / 1.5, (before, after)
    losses = result["losses"]
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:20]) / 20
    assert meta[ckpt.QUALITY_STATS] == {"quality_stats.json": {"mu": 3.8, "sigma": 0.2}}
    assert meta[ckpt.REPRESENTATION]["autoencoder"] == "identity"
    assert meta[ckpt.TRAIN_STATE] == {"step": 200, "world_size": 1, "samples_seen": 800}


def _load_cfg(cfg, text_dir):
    from model.train import resolve_model_config

    return resolve_model_config(cfg, Representation(cfg.representation), FrozenTextEncoder(cfg.text).dim)


@pytest.mark.slow
def test_resume_matches_uninterrupted(tmp_path, shard_dir, text_encoder_dir, tiny_train_config):
    kw = dict(data={"num_workers": 2}, checkpoint_every=4)
    full = main(tiny_train_config(shard_dir, text_encoder_dir, str(tmp_path / "a"), max_steps=12, **kw))
    first = main(tiny_train_config(shard_dir, text_encoder_dir, str(tmp_path / "b"), max_steps=7, **kw))
    second = main(tiny_train_config(shard_dir, text_encoder_dir, str(tmp_path / "b"), max_steps=12, **kw))
    assert first["losses"] == full["losses"][:7]
    assert len(second["losses"]) == 12 - 7  # resumed from the step-7 checkpoint
    assert second["losses"] == pytest.approx(full["losses"][7:], rel=1e-6, abs=1e-7)
    a, b = ckpt.read_group(full["checkpoint"], "ema"), ckpt.read_group(second["checkpoint"], "ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bad_config_values_are_named(tmp_path):
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match="hugh"):
        from_dict(TrainConfig, {"preset": "hugh"})
    with pytest.raises(ConfigError, match="nonsense"):
        from_dict(TrainConfig, {"diffusion": {"nonsense": 1}})
    with pytest.raises(ConfigError, match="quality_weights"):
        from_dict(TrainConfig, {"data": {"quality_weights": [1, 2]}})


@pytest.mark.slow
def test_train_cli_reads_yaml(tmp_path, shard_dir, text_encoder_dir, capsys):
    from model.train import cli

    yaml_path = tmp_path / "train.yaml"
    yaml_path.write_text(
        "preset: tiny\nmodel: {patch_size: [16, 8]}\n"
        "data: {clip_seconds: 1.28, batch_size: 2, num_workers: 0}\n"
        "optim: {warmup_steps: 1}\nlog_every: 1\n"
    )
    args = ["--config", str(yaml_path), "--shards", shard_dir, "--text-encoder", text_encoder_dir,
            "--output-dir", str(tmp_path / "out"), "--max-steps", "2"]
    assert cli(args) == 0
    assert '"step": 2' in capsys.readouterr().out
    saved = (tmp_path / "out" / "train_config.json").read_text()
    assert '"preset": "tiny"' in saved and str(tmp_path / "out") in saved


def test_mask_ratio_is_one_draw_per_step_for_every_rank():
    from model.qamdt import model_config
    from model.train import mask_ratio_for_step

    model = build_model(model_config("tiny", freq_size=8, patch_size=(4, 4), cond_dim=8))
    cfg = TrainConfig()
    ratios = [mask_ratio_for_step(model, cfg, s) for s in range(200)]
    assert ratios == [mask_ratio_for_step(model, cfg, s) for s in range(200)]  # (seed, step) only: no rank, no RNG state
    assert min(ratios) >= 0.30 and max(ratios) < 0.50 and len(set(ratios)) == 200
    compiled = dataclasses.replace(cfg, compile=True, mask_ratio_buckets=4)
    buckets = {mask_ratio_for_step(model, compiled, s) for s in range(200)}
    assert sorted(buckets) == pytest.approx([0.325, 0.375, 0.425, 0.475])
    assert mask_ratio_for_step(model, dataclasses.replace(cfg, diffusion=DiffusionConfig(masked_training=False)), 0) is None


def test_foreach_ema_matches_the_per_parameter_update():
    from model.qamdt import model_config
    from model.train import update_ema

    torch.manual_seed(0)
    model = build_model(model_config("tiny", freq_size=8, patch_size=(4, 4), cond_dim=8))
    ema = build_model(model.cfg)
    want = {k: v.clone() for k, v in ema.state_dict().items()}
    params = dict(model.named_parameters())
    for k in want:
        if k in params:
            d = min(0.99, (1 + 3) / (10 + 3))
            want[k] = want[k] + (1 - d) * (params[k].detach() - want[k])
    update_ema(ema, model, step=3, decay=0.99)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, want[k])


def test_gpu_flag_and_pinned_loader(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from train_throughput import write_shards  # mosaiq-layout shards without the export stage (no Ray)

    from model import train as T

    shard_dir = str(tmp_path / "shards")
    Path(shard_dir).mkdir()
    write_shards(Path(shard_dir), n=4, seconds=1.28)

    seen = {}
    monkeypatch.setattr(T, "main", lambda cfg: seen.setdefault("cfg", cfg) and {"step": 0})
    T.cli(["--shards", shard_dir, "--gpu", "--ray-workers", "2", "--compile", "--output-dir", str(tmp_path)])
    cfg = seen["cfg"]
    assert cfg.ray_use_gpu and cfg.device == "cuda" and cfg.ray_workers == 2 and cfg.compile
    data = dataclasses.replace(cfg, data=DataConfig(shards=shard_dir, num_workers=0))
    assert T.make_train_loader(data, 0, 1, 0, torch.device("cuda")).pin_memory
    assert not T.make_train_loader(data, 0, 1, 0, torch.device("cpu")).pin_memory


@pytest.mark.slow
def test_compiled_tiny_trains_and_logs_every_n(tmp_path, shard_dir, text_encoder_dir, tiny_train_config):
    cfg = tiny_train_config(shard_dir, text_encoder_dir, str(tmp_path / "c"), max_steps=7, log_every=5, compile=True,
                            compile_backend="eager")  # graph capture only: inductor takes minutes on a CPU
    reported = []
    result = __import__("model.train", fromlist=["train_loop"]).train_loop(cfg, report=reported.append)
    assert len(result["losses"]) == 7 and all(l == l for l in result["losses"])  # noqa: E741
    assert [m["step"] for m in reported] == [5, 7]
    names = set(ckpt.read_group(result["checkpoint"], "model"))
    assert not any("_orig_mod" in n for n in names)  # compiled in place: checkpoints keep the plain names


def _official_tiny(tmp_path, shard_dir, text_encoder_dir, out, **kw):
    """jobs/train-qamdt-official.yaml at the tiny size over a tiny AudioLDM-layout VAE file."""
    from pathlib import Path

    import yaml

    from tests.model.test_audioldm import TINY_VAE, TINY_VOC, _release_like

    path = tmp_path / "audioldm-tiny.safetensors"
    if not path.exists():
        _release_like(tmp_path, "safetensors")
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "train-qamdt-official.yaml").read_text())
    raw["representation"].update(autoencoder_checkpoint=str(path), audioldm_vae=dataclasses.asdict(TINY_VAE),
                                 audioldm_vocoder=dataclasses.asdict(TINY_VOC))
    raw.update(preset="tiny", output_dir=out, max_steps=kw.pop("max_steps"), log_every=5,
               data={"shards": shard_dir, "clip_seconds": 1.28, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8},
               text={"path": text_encoder_dir}, optim={"lr": 2e-3, "warmup_steps": 5, "ema_decay": 0.99})
    raw["model"]["patch_size"] = [4, 4]  # 32 x 16 latent -> 32 tokens
    raw.update(kw)
    return from_dict(TrainConfig, raw)


@pytest.mark.slow
def test_official_preset_tiny_trains_measures_the_latent_scale_and_resumes(tmp_path, shard_dir, text_encoder_dir):
    full = main(_official_tiny(tmp_path, shard_dir, text_encoder_dir, str(tmp_path / "a"), max_steps=60))
    losses = full["losses"]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10, losses
    meta = ckpt.read_metadata(full["checkpoint"])
    rep_meta = meta[ckpt.REPRESENTATION]
    assert rep_meta["autoencoder"] == "audioldm" and rep_meta["scale_by_std"]
    # the stored scale is 1 / std of the first batch's (unscaled) latents
    cfg = _official_tiny(tmp_path, shard_dir, text_encoder_dir, str(tmp_path / "x"), max_steps=1)
    from model.train import make_train_loader

    first = next(iter(make_train_loader(cfg, 0, 1, 0, torch.device("cpu"))))
    z = Representation(cfg.representation).encode(first[AUDIO])
    assert rep_meta["latent_scale"] == pytest.approx(1 / z.double().std(unbiased=False).item(), rel=1e-5)
    assert rep_meta["latent_scale"] != 1.0
    assert meta[ckpt.MODEL_CONFIG]["adaln"] == "single" and meta[ckpt.MODEL_CONFIG]["in_channels"] == 8
    # exact resume: a run stopped at step 7 and continued matches an uninterrupted one
    kw = dict(checkpoint_every=7)
    ref = main(_official_tiny(tmp_path, shard_dir, text_encoder_dir, str(tmp_path / "b"), max_steps=12, **kw))
    main(_official_tiny(tmp_path, shard_dir, text_encoder_dir, str(tmp_path / "c"), max_steps=7, **kw))
    second = main(_official_tiny(tmp_path, shard_dir, text_encoder_dir, str(tmp_path / "c"), max_steps=12, **kw))
    assert second["losses"] == pytest.approx(ref["losses"][7:], rel=1e-6, abs=1e-7)
    assert ckpt.read_metadata(second["checkpoint"])[ckpt.REPRESENTATION]["latent_scale"] == rep_meta["latent_scale"]
