"""CLAP backends load offline from local files: LAION `.pt` checkpoints written the way LAION's
training writes them (random-weight HTSAT-tiny, HTSAT-base and a fused one), and a transformers
CLAP folder; embeddings equal laion-clap's own; crops are deterministic; the audio model comes
from the tensors; both backends cut text at 77 tokens; unsafe checkpoints are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from model import clap as C  # noqa: E402

LONG_TEXT = "an energetic rock song with electric guitar and calm jazz with piano and brushed drums " * 8


def save_like_laion(module, path, save_with_numpy1_names, numpy1_names=False):
    """As laion_clap/training/main.py writes a checkpoint: the DDP-wrapped model's state_dict
    (`module.` keys), the epoch, the run name, and the AdamW state whose param-group `lr` the
    cosine schedule (training/scheduler.py) has set to a numpy.float64."""
    named = list(module.model.named_parameters())
    gain_or_bias = [p for n, p in named if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n]
    rest = [p for n, p in named if p.ndim >= 2 and not ("bn" in n or "ln" in n or "bias" in n or "logit_scale" in n)]
    optimizer = torch.optim.AdamW([{"params": gain_or_bias, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.2}], lr=1e-3)
    for group in optimizer.param_groups:
        group["lr"] = 0.5 * (1 + np.cos(np.pi * 3 / 10)) * 1e-3  # numpy.float64, as cosine_lr computes it
    assert isinstance(optimizer.param_groups[0]["lr"], np.float64)
    ckpt = {
        "epoch": 1,
        "name": "2022_12_random-music-audioset",
        "state_dict": {"module." + k: v for k, v in module.model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
    }
    (save_with_numpy1_names if numpy1_names else torch.save)(ckpt, path)
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def laion_files(tmp_path_factory, caption_kit):
    F = caption_kit
    root = tmp_path_factory.mktemp("laion")
    text = F.roberta_text_folder(root / "roberta")
    torch.manual_seed(0)
    module = C.build_laion_module(text, amodel="HTSAT-tiny")  # untrained: random weights
    ckpt = root / "tiny_clap.pt"
    C.save_laion_checkpoint(module, ckpt)  # mosaiq's writer (benchmarks use it) must load too
    return module, text, ckpt


@pytest.mark.parametrize(
    "amodel, fusion, numpy1_names",
    [("HTSAT-tiny", False, True), ("HTSAT-base", False, False), ("HTSAT-tiny", True, False)],
    ids=["tiny-630k-style", "base-music-style", "tiny-fused"],
)
def test_laion_format_checkpoint_embeds_like_laion_clap(laion_files, tmp_path, amodel, fusion, numpy1_names, caption_kit, save_with_numpy1_names):
    F = caption_kit
    _, text, _ = laion_files
    torch.manual_seed(1)
    module = C.build_laion_module(text, amodel, enable_fusion=fusion)
    ckpt = save_like_laion(module, tmp_path / "epoch_1.pt", save_with_numpy1_names, numpy1_names)
    clap = C.load_clap("laion", ckpt, text, seed=7)  # audio model: auto, from the tensors
    assert (clap.amodel, clap.fusion) == (amodel, fusion)
    waves = [F.tone(12.5), F.noise(3.0)]  # cropped to the 10 s window, repeat-padded to it
    keys = ["long", "short"]
    got_audio = clap.embed_audio(waves, keys)
    texts = [F.TONE_TEXT, LONG_TEXT, ""]
    got_text = clap.embed_text(texts)
    del clap
    module.model.eval()
    with torch.no_grad():
        ref_audio = module.get_audio_embedding_from_data([C.crop_window(w, k, 7) for w, k in zip(waves, keys)], use_tensor=False)
        ref_text = module.get_text_embedding(texts, use_tensor=False)
    np.testing.assert_allclose(got_audio, ref_audio / np.linalg.norm(ref_audio, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(got_text, ref_text / np.linalg.norm(ref_text, axis=1, keepdims=True), atol=1e-5)


def test_audio_model_is_read_from_the_tensors_and_a_contradiction_is_refused(laion_files, tmp_path):
    module, text, ckpt = laion_files
    with pytest.raises(C.ClapModelError, match="'HTSAT-base' was asked for.*HTSAT-tiny"):
        C.load_clap("laion", ckpt, text, amodel="HTSAT-base")
    assert C.load_clap("laion", ckpt, text, amodel="HTSAT-tiny").amodel == "HTSAT-tiny"
    with pytest.raises(C.ClapModelError, match="not one of"):
        C.load_clap("laion", ckpt, text, amodel="HTSAT-huge")
    state = module.model.state_dict()
    assert C.laion_architecture(state) == ("HTSAT-tiny", False)
    odd = dict(state)
    odd["audio_branch.patch_embed.proj.weight"] = torch.zeros(64, 1, 4, 4)
    with pytest.raises(C.ClapModelError, match="width 64 with 6 blocks in stage 3 matches no supported HTSAT"):
        C.laion_architecture(odd)
    with pytest.raises(C.ClapModelError, match="not a LAION HTSAT"):
        C.laion_architecture({k: v for k, v in state.items() if "patch_embed" not in k})
    half_fused = dict(state, **{"audio_branch.patch_embed.mel_conv2d.weight": torch.zeros(96, 1, 4, 12)})
    with pytest.raises(C.ClapModelError, match="partly fused"):
        C.laion_architecture(half_fused)


def test_both_backends_cut_text_at_77_tokens(laion_files, tmp_path, caption_kit):
    F = caption_kit
    _, text, ckpt = laion_files
    laion = C.load_clap("laion", ckpt, text)
    model, features, tok = F.tiny_hf_clap()  # its tokenizer is trained like the laion text folder's
    model.save_pretrained(tmp_path)
    features.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hf = C.load_clap("hf", tmp_path)
    for t in [LONG_TEXT, F.TONE_TEXT]:
        ids_laion = laion.tokenize([t])["input_ids"][0]
        ids_hf = hf.tokenize([t])["input_ids"][0]
        assert len(ids_laion) == C.TEXT_MAX_TOKENS  # laion pads to 77
        pad = tok.pad_token_id
        assert ids_hf.tolist() == [i for i in ids_laion.tolist() if i != pad]
    assert len(hf.tokenize([LONG_TEXT])["input_ids"][0]) == C.TEXT_MAX_TOKENS


def test_laion_checkpoint_loads_offline_and_matches_the_saved_module(laion_files, caption_kit):
    F = caption_kit
    module, text, ckpt = laion_files
    clap = C.LaionClap(ckpt, text, seed=3)
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
        f"clap = C.load_clap('laion', {str(ckpt)!r}, {str(text)!r})\n"
        "print(clap.embed_text(['a tone']).shape[0])\n"
        "import transformers.utils as U\n"
        "print(importlib.util.find_spec('torchvision') is None, U.is_torchvision_available(), 'torchvision' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-3:-1] == ["1", "True False False"]


class TrainingState:
    """Any pickled object outside the allowlist (numpy scalars/dtypes, argparse.Namespace)."""


def test_laion_refuses_a_checkpoint_that_needs_unpickling(laion_files, tmp_path):
    _, text, ckpt = laion_files
    bad = tmp_path / "pickled.pt"
    state = C.read_laion_state_dict(ckpt)
    torch.save({"epoch": 1, "state_dict": state, "trainer": TrainingState()}, bad)
    with pytest.raises(C.ClapModelError, match="weights_only=True") as err:
        C.LaionClap(bad, text)
    assert "TrainingState" in str(err.value)
    with pytest.raises(C.ClapModelError, match="does not exist"):
        C.LaionClap(tmp_path / "missing.pt", text)
    with pytest.raises(C.ClapModelError, match="roberta"):
        C.load_clap("laion", ckpt, None)


def test_transformers_clap_folder_loads_offline(tmp_path, caption_kit):
    F = caption_kit
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
    with pytest.raises(C.ClapModelError, match="width 16 matches no supported HTSAT; cannot check 'HTSAT-tiny'"):
        C.load_clap("hf", tmp_path, amodel="HTSAT-tiny")


def test_crop_window_is_seeded_and_keyed():
    wave = np.arange(C.WINDOW_SAMPLES * 2, dtype=np.float32)
    a = C.crop_window(wave, "k", 0)
    assert len(a) == C.WINDOW_SAMPLES
    np.testing.assert_array_equal(a, C.crop_window(wave, "k", 0))
    assert a[0] != C.crop_window(wave, "k", 1)[0] or a[0] != C.crop_window(wave, "other", 0)[0]
    short = np.ones(100, np.float32)
    assert C.crop_window(short, "k", 0) is not None and len(C.crop_window(short, "k", 0)) == 100


def test_transformers_clap_truncates_long_text_to_its_positions(tmp_path, caption_kit):
    F = caption_kit
    model, features, tok = F.tiny_hf_clap()
    model.save_pretrained(tmp_path)
    features.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clap = C.load_clap("hf", tmp_path)
    emb = clap.embed_text(["an energetic rock song with electric guitar " * 20])  # far past 80 positions
    assert emb.shape == (1, 16) and np.isfinite(emb).all()
