"""CLAP backends load offline from local files: a LAION `.pt` saved from a tiny CLAP_Module,
and a transformers CLAP folder; crops are deterministic; unsafe checkpoints are refused."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
import _caption_fixtures as F  # noqa: E402

from model import clap as C  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def laion_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion")
    text = F.roberta_text_folder(root / "roberta")
    torch.manual_seed(0)
    module = C.build_laion_module(text, amodel="HTSAT-tiny")  # untrained: random weights
    ckpt = root / "tiny_clap.pt"
    C.save_laion_checkpoint(module, ckpt)
    return module, text, ckpt


def test_laion_checkpoint_loads_offline_and_matches_the_saved_module(laion_files):
    module, text, ckpt = laion_files
    clap = C.LaionClap(ckpt, text, amodel="HTSAT-tiny", seed=3)
    for name, tensor in module.model.state_dict().items():
        assert torch.equal(tensor, clap.module.model.state_dict()[name]), name
    waves = [F.tone(12.0), F.noise(4.0)]  # one longer than the window (cropped), one shorter (padded)
    a1 = clap.embed_audio(waves, ["x", "y"])
    a2 = clap.embed_audio(waves, ["x", "y"])
    t = clap.embed_text([F.TONE_TEXT, F.NOISE_TEXT, ""])
    assert a1.shape[0] == 2 and t.shape == (3, a1.shape[1])
    np.testing.assert_allclose(np.linalg.norm(a1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(a1, a2)  # deterministic crop, eval mode
    # same as laion's own API on the same crop
    crop = C.crop_window(waves[0], "x", 3)
    module.model.eval()
    ref = module.get_audio_embedding_from_data([crop], use_tensor=False)
    np.testing.assert_allclose(a1[0], ref[0] / np.linalg.norm(ref[0]), atol=1e-4)


def test_laion_loads_in_a_fresh_interpreter_and_leaves_no_stub_behind(laion_files):
    """As in a Ray actor: nothing imported before. The stand-in modules laion-clap needs at
    import must not stay in sys.modules, where transformers' probe for torchvision trips on them."""
    _, text, ckpt = laion_files
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys, importlib.util\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from model import clap as C\n"
        f"clap = C.load_clap('laion', {str(ckpt)!r}, {str(text)!r}, amodel='HTSAT-tiny')\n"
        "print(clap.embed_text(['a tone']).shape[0])\n"
        "import transformers.utils as U\n"
        "print(importlib.util.find_spec('torchvision') is None, U.is_torchvision_available(), 'torchvision' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-3:-1] == ["1", "True False False"]


def test_laion_refuses_a_checkpoint_that_needs_unpickling(laion_files, tmp_path):
    _, text, ckpt = laion_files
    bad = tmp_path / "pickled.pt"
    state = torch.load(ckpt, weights_only=True)
    state["args"] = argparse.Namespace(lr=1.0)  # what training scripts often save
    torch.save(state, bad)
    with pytest.raises(C.ClapModelError, match="weights_only"):
        C.LaionClap(bad, text, amodel="HTSAT-tiny")
    with pytest.raises(C.ClapModelError, match="does not exist"):
        C.LaionClap(tmp_path / "missing.pt", text, amodel="HTSAT-tiny")
    with pytest.raises(C.ClapModelError, match="roberta"):
        C.load_clap("laion", ckpt, None)


def test_transformers_clap_folder_loads_offline(tmp_path):
    model, features, tok = F.tiny_hf_clap()
    model.save_pretrained(tmp_path)
    features.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clap = C.load_clap("hf", tmp_path, seed=0)
    waves = [F.tone(10.24), F.noise(2.0)]
    a = clap.embed_audio(waves, ["a", "b"])
    t = clap.embed_text([F.TONE_TEXT, F.NOISE_TEXT])
    assert a.shape == (2, 16) and t.shape == (2, 16)
    np.testing.assert_array_equal(a, clap.embed_audio(waves, ["a", "b"]))
    sims = C.similarity(a, t)
    assert sims.shape == (2, 2) and np.all(np.abs(sims) <= 1.0 + 1e-6)
    with pytest.raises(C.ClapModelError, match="config.json"):
        C.load_clap("hf", tmp_path / "nothing")
    with pytest.raises(C.ClapModelError, match="backend"):
        C.load_clap("other", tmp_path)


def test_crop_window_is_seeded_and_keyed():
    wave = np.arange(C.WINDOW_SAMPLES * 2, dtype=np.float32)
    a = C.crop_window(wave, "k", 0)
    assert len(a) == C.WINDOW_SAMPLES
    np.testing.assert_array_equal(a, C.crop_window(wave, "k", 0))
    assert a[0] != C.crop_window(wave, "k", 1)[0] or a[0] != C.crop_window(wave, "other", 0)[0]
    short = np.ones(100, np.float32)
    assert C.crop_window(short, "k", 0) is not None and len(C.crop_window(short, "k", 0)) == 100


def test_transformers_clap_truncates_long_text_to_its_positions(tmp_path):
    model, features, tok = F.tiny_hf_clap()
    model.save_pretrained(tmp_path)
    features.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clap = C.load_clap("hf", tmp_path)
    emb = clap.embed_text(["an energetic rock song with electric guitar " * 20])  # far past 80 positions
    assert emb.shape == (1, 16) and np.isfinite(emb).all()
