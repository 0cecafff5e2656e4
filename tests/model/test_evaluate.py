"""`evaluate` (CLAP score, FAD with a pluggable embedding), `generate` with CLAP-reranked
candidates and a prompts file, and validation loss / samples during training; tiny models."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from jobs.config import from_dict, to_dict
from model import checkpoint as ckpt
from model.evaluate import EvaluateConfig, frechet_distance, main as evaluate
from model.generate import GenerateConfig, main as generate, rerank
from model.qamdt import build_model
from model.representation import Representation
from model.text import FrozenTextEncoder
from model.train import TrainConfig, resolve_model_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, text_encoder_dir):
    """A random tiny QA-MDT checkpoint (every branch open) with the metadata training writes."""
    out = tmp_path_factory.mktemp("ckpt")
    cfg = from_dict(TrainConfig, {"preset": "tiny", "model": {"patch_size": [16, 8]}, "text": {"path": text_encoder_dir},
                                  "data": {"clip_seconds": 1.28}, "output_dir": str(out)})
    mcfg = resolve_model_config(cfg, Representation(cfg.representation), FrozenTextEncoder(cfg.text).dim)
    torch.manual_seed(0)
    model = build_model(mcfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    import dataclasses

    meta = {ckpt.TRAIN_CONFIG: to_dict(cfg), ckpt.MODEL_CONFIG: dataclasses.asdict(mcfg),
            ckpt.REPRESENTATION: to_dict(cfg.representation), ckpt.QUALITY_STATS: {},
            ckpt.TRAIN_STATE: {"step": 0, "world_size": 1, "samples_seen": 0}}
    return str(ckpt.save_checkpoint(out / "step-000000000.safetensors", model, copy.deepcopy(model), torch.optim.AdamW(model.parameters()), meta))


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory, caption_kit):
    F = caption_kit

    model, features, tok = F.tiny_hf_clap(seed=0)
    folder = tmp_path_factory.mktemp("clap")
    model.save_pretrained(folder)
    features.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 2))
    b = rng.standard_normal((4000, 2)) * 2.0 + np.array([1.0, 0.0])
    # N(0, I) vs N((1, 0), 4I): 1 + tr(I + 4I - 2 * 2I) = 1 + 2 = 3
    assert frechet_distance(a, b) == pytest.approx(3.0, rel=0.05)
    assert abs(frechet_distance(a, a)) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


class _FakeClap:
    """Audio embedding = (rms, 1); text embedding picks loud or quiet: under our control."""

    def embed_audio(self, waves, keys):
        e = np.array([[np.sqrt(np.mean(np.square(w))), 0.05] for w in waves])
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def embed_text(self, texts):
        e = np.array([[1.0, 0.0] if "loud" in t else [0.0, 1.0] for t in texts])
        return e


def test_rerank_keeps_each_prompts_best_candidate():
    waves = np.stack([np.full(160, a, dtype=np.float32) for a in (0.1, 0.5, 0.3, 0.01, 0.2, 0.001)])  # 2 prompts x 3
    kept, scores = rerank(waves, ["loud", "quiet"], 3, 16000, _FakeClap())
    assert kept.shape == (2, 160)
    assert kept[0, 0] == pytest.approx(0.5) and kept[1, 0] == pytest.approx(0.001)
    assert scores[0] > 0.99 and scores[1] > 0.99


@pytest.mark.slow
def test_generate_candidates_from_a_prompts_file_with_a_tiny_clap(tiny_checkpoint, clap_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("high quality, a tone\n\nlow quality, noise\n")
    cfg = GenerateConfig(checkpoint=tiny_checkpoint, prompts_file=str(prompts), out=str(tmp_path / "g.wav"), seconds=0.5,
                         ddim_steps=2, candidates=3, batch_size=4, clap_path=clap_folder, bf16=True, ddim_eta=1.0)
    paths = generate(cfg)
    assert [p.name for p in paths] == ["g_000.wav", "g_001.wav"]
    for p in paths:
        w, sr = sf.read(str(p))
        assert sr == 16000 and w.shape == (8000,) and np.isfinite(w).all()
    with pytest.raises(ValueError, match="clap_path"):
        generate(GenerateConfig(checkpoint=tiny_checkpoint, prompts=("x",), candidates=2, out=str(tmp_path / "h.wav")))


def embedding_factory():
    """A "local embedding model": mean and std of a 32-band magnitude spectrum."""
    def embed(waves, sample_rate):
        out = []
        for w in waves:
            spec = np.abs(np.fft.rfft(w))[: 32 * (len(w) // 64)].reshape(32, -1).mean(1)
            out.append(np.log1p(spec))
        return np.stack(out)

    return embed


@pytest.mark.slow
def test_evaluate_reports_clap_score_and_fad(tiny_checkpoint, clap_folder, tmp_path, caption_kit):
    F = caption_kit

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("high quality, a tone\nmedium quality, a hum\nlow quality, noise\n")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        F.write_wav(ref / f"r{i}.wav", F.tone(1.0, freq=200.0 * (i + 1), seed=i), sr=48000)
    base = dict(checkpoint=tiny_checkpoint, prompts_file=str(prompts), reference=str(ref), clap_path=clap_folder,
                seconds=0.5, ddim_steps=2, batch_size=3)
    report = evaluate(EvaluateConfig(**base, out_dir=str(tmp_path / "ev")))
    assert report["generated"] == 3 and report["reference"] == 3
    assert -1.0 <= report["clap_score"] <= 1.0 and len(report["clap_scores"]) == 3
    assert np.isfinite(report["fad"]) and report["fad"] >= -1e-6
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["fad"] == report["fad"]
    # any local embedding model, named as package.module:factory
    other = evaluate(EvaluateConfig(**base, out_dir=str(tmp_path / "ev2"), embedding="tests.model.test_evaluate:embedding_factory"))
    assert other["fad"] != report["fad"] and other["clap_score"] == pytest.approx(report["clap_score"])


@pytest.mark.slow
def test_training_logs_validation_loss_and_writes_samples(tmp_path, text_encoder_dir, tiny_train_config):
    from train_throughput import write_shards  # mosaiq-layout shards without the export stage

    from model.train import train_loop

    for name, n in (("train", 8), ("val", 4)):
        (tmp_path / name).mkdir()
        write_shards(tmp_path / name, n=n, seconds=1.28, seed=len(name))
    cfg = tiny_train_config(str(tmp_path / "train"), text_encoder_dir, str(tmp_path / "run"), max_steps=4, log_every=2,
                            val_shards=str(tmp_path / "val"), val_every=2, val_batches=1, sample_every=4,
                            sample_prompts=["high quality, a tone"], sample_steps=2)
    reported = []
    train_loop(cfg, report=reported.append)
    vals = [m["val_loss"] for m in reported]
    assert len(vals) == 2 and all(np.isfinite(vals))
    samples = sorted((tmp_path / "run" / "samples").glob("*.wav"))
    assert [p.name for p in samples] == ["step-000000004_0.wav"]
    assert sf.read(str(samples[0]))[0].shape == (20480,)
