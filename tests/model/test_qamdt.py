"""QA-MDT architecture: patchify, masking path, quality token, guidance, presets."""

from __future__ import annotations

import pytest
import torch

from model.diffusion import DiffusionConfig, GaussianDiffusion
from model.qamdt import PRESETS, Patchifier, QAMDTConfig, build_model, model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COND = 16


def _tiny(**kw) -> torch.nn.Module:
    cfg = model_config("tiny", in_channels=2, freq_size=16, patch_size=(4, 4), cond_dim=COND, **kw)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # open the zero-initialised branches so every path matters
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return model


def _inputs(n=2, T=32, F=16, S=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, T, F, generator=g)
    t = torch.tensor([10, 900])[:n]
    q = torch.tensor([5, 1])[:n]
    y = torch.randn(n, S, COND, generator=g)
    m = torch.ones(n, S, dtype=torch.bool)
    m[0, 3:] = False
    return x, t, q, y, m


@pytest.mark.parametrize("patch,overlap,size", [((4, 4), (0, 0), (32, 16)), ((4, 2), (2, 1), (30, 15)), ((16, 4), (4, 0), (100, 64))])
def test_patchify_unpatchify_identity(patch, overlap, size):
    p = Patchifier(patch, overlap)
    x = torch.randn(3, 2, *size)
    tokens = p.patchify(x)
    gt, gf = p.grid(size)
    assert tokens.shape == (3, gt * gf, 2 * patch[0] * patch[1])
    assert p.positions(size).shape == (gt * gf, 2)
    torch.testing.assert_close(p.unpatchify(tokens, size), x)


def test_overlap_is_averaged():
    p = Patchifier((4, 1), (2, 0))
    tokens = torch.ones(1, p.grid((8, 1))[0], 4)
    tokens[:, 1] = 3.0  # patch 1 covers rows 2..5, overlapping patches 0 and 2 on two rows each
    out = p.unpatchify(tokens, (8, 1))[0, 0, :, 0]
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]))


def test_mask_ratio_zero_equals_unmasked_path():
    model = _tiny()
    x, t, q, y, m = _inputs()
    full = model(x, t, q, y, m, mask_ratio=None)
    masked = model(x, t, q, y, m, mask_ratio=0.0)  # shuffles tokens, runs the side interpolator
    assert full.shape == x.shape
    torch.testing.assert_close(masked, full, atol=1e-5, rtol=1e-4)
    # and a real mask ratio does change the prediction
    assert not torch.allclose(model(x, t, q, y, m, mask_ratio=0.5), full, atol=1e-4)


def test_quality_token_changes_output_and_is_stripped():
    model = _tiny()
    x, t, _, y, m = _inputs()
    seen = []
    hook = model.final_layer.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    hi = model(x, t, torch.tensor([5, 5]), y, m)
    lo = model(x, t, torch.tensor([1, 1]), y, m)
    model(x, t, torch.tensor([5, 5]), y, m, mask_ratio=0.3)
    hook.remove()
    assert not torch.allclose(hi, lo, atol=1e-4)
    L = model.patchifier.patchify(x).shape[1]
    assert seen == [torch.Size([2, L, model.cfg.hidden_size])] * 3  # no prefix token reaches the final layer


def test_variable_length_and_text_padding():
    model = _tiny()
    x, t, q, y, m = _inputs(T=48)
    assert model(x, t, q, y, m).shape == x.shape
    # padded text positions do not matter
    y2 = y.clone()
    y2[0, 3:] = 100.0
    torch.testing.assert_close(model(x, t, q, y2, m), model(x, t, q, y, m))


def test_guidance_w0_is_conditional_and_formula():
    model = _tiny()
    x, t, q, y, m = _inputs()
    null_y, null_m = torch.zeros(1, 1, COND), torch.zeros(1, 1, dtype=torch.bool)
    cond = model(x, t, q, y, m)
    guided0 = GaussianDiffusion.guided_eps(model, x, t, q, y, m, null_y, null_m, w=0.0, uncond_quality=1)
    torch.testing.assert_close(guided0, cond)
    unc = model(x, t, torch.tensor([1, 1]), null_y.expand(2, 5, COND).clone(), torch.zeros(2, 5, dtype=torch.bool))
    guided = GaussianDiffusion.guided_eps(model, x, t, q, y, m, null_y, null_m, w=3.5, uncond_quality=1)
    torch.testing.assert_close(guided, cond + 3.5 * (cond - unc), atol=1e-4, rtol=1e-4)


def test_ddim_sample_shape_and_seed():
    model = _tiny()
    diff = GaussianDiffusion(DiffusionConfig(ddim_steps=5))
    _, _, q, y, m = _inputs()
    null_y, null_m = torch.zeros(1, 1, COND), torch.zeros(1, 1, dtype=torch.bool)
    a = diff.ddim_sample(model, (2, 2, 32, 16), q, y, m, null_y, null_m, generator=torch.Generator().manual_seed(3))
    b = diff.ddim_sample(model, (2, 2, 32, 16), q, y, m, null_y, null_m, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 2, 32, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)


def test_schedule_endpoints():
    d = GaussianDiffusion(DiffusionConfig())
    assert d.betas.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(0.0015) and d.betas[-1].item() == pytest.approx(0.0195)


def test_presets_and_bad_config():
    assert set(PRESETS) == {"tiny", "small", "base", "large", "xl"}
    xl = model_config("xl")
    assert (xl.hidden_size, xl.num_heads, xl.depth) == (1152, 16, 28)
    with pytest.raises(ValueError, match="huge"):
        model_config("huge")
    with pytest.raises(ValueError, match="overlap"):
        QAMDTConfig(patch_size=(4, 1), overlap=(4, 0))
    # the depth split of the official code: (28 - 8) / 2 in, 10 out, 8 decoder blocks
    m = build_model(model_config("tiny"))
    assert (len(m.en_inblocks), len(m.en_outblocks), len(m.de_blocks)) == (1, 1, 2)


def test_adaln_single_saves_the_per_block_mlps_and_keeps_the_masking_identity():
    from model.qamdt import parameter_count, preset_table

    zero, single = _tiny(), _tiny(adaln="single")
    assert single.t_block is not None and not hasattr(single.sideblock, "adaLN_modulation")
    d, blocks = 64, len(zero.blocks())
    # per-block 6D modulation MLPs and the final layer's 2D one, minus the shared 6D MLP
    saved = blocks * (6 * d * d + 6 * d) + (2 * d * d + 2 * d) - (6 * d * d + 6 * d) - blocks * 6 * d - 2 * d
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(zero) - n(single) == saved
    assert parameter_count(single.cfg) == n(single)
    x, t, q, y, m = _inputs()
    full = single(x, t, q, y, m)
    assert full.shape == x.shape
    torch.testing.assert_close(single(x, t, q, y, m, mask_ratio=0.0), full, atol=1e-5, rtol=1e-4)
    # at init (shared MLP and output layer at zero) the prediction is zero, as adaLN-Zero's
    init = build_model(single.cfg)
    assert torch.count_nonzero(init(x, t, q, y, m)) == 0
    xl = {r["preset"]: r for r in preset_table()}["xl"]
    assert 220e6 < xl["params_adaln_zero"] - xl["params_adaln_single"] < 240e6
    with pytest.raises(ValueError, match="adaln"):
        model_config("tiny", adaln="double")


def test_min_snr_weights_and_loss():
    d = GaussianDiffusion(DiffusionConfig(loss_weighting="min_snr", min_snr_gamma=5.0))
    t = torch.tensor([0, 100, 500, 999])
    ab = d.alphas_cumprod[t]
    snr = ab / (1 - ab)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    torch.testing.assert_close(d.loss_weights(t), expected.float())
    assert d.loss_weights(torch.tensor([999])).item() == 1.0  # SNR < gamma: plain MSE
    assert d.loss_weights(torch.tensor([0])).item() < 0.01  # nearly clean: down-weighted
    plain = GaussianDiffusion(DiffusionConfig())
    x0 = torch.randn(3, 1, 8, 4)

    def zero_model(x, t, *a, **k):
        return torch.zeros_like(x)

    for diff in (d, plain):  # a zero prediction: each sample's MSE is its noise's mean square
        torch.manual_seed(5)
        loss = diff.training_loss(zero_model, x0, None, None, None)
        torch.manual_seed(5)
        tt = torch.randint(0, 1000, (3,))
        noise = torch.randn_like(x0)
        want = (diff.loss_weights(tt) * (noise**2).flatten(1).mean(1)).mean()
        torch.testing.assert_close(loss, want)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        DiffusionConfig(min_snr_gamma=0.0)


def test_ddim_eta_adds_seeded_noise():
    model = _tiny()
    diff = GaussianDiffusion(DiffusionConfig(ddim_steps=4))
    _, _, q, y, m = _inputs()
    null_y, null_m = torch.zeros(1, 1, COND), torch.zeros(1, 1, dtype=torch.bool)
    run = lambda eta: diff.ddim_sample(model, (2, 2, 32, 16), q, y, m, null_y, null_m,  # noqa: E731
                                       generator=torch.Generator().manual_seed(3), eta=eta, w=2.5, uncond_quality=3)
    a, b, c = run(1.0), run(1.0), run(0.0)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all() and not torch.allclose(a, c)


def test_official_preset_yaml():
    from pathlib import Path

    from jobs.config import load
    from model.train import TrainConfig

    path = Path(__file__).resolve().parents[2] / "jobs" / "train-qamdt-official.yaml"
    cfg = load(TrainConfig, str(path))
    d = cfg.diffusion
    assert (d.loss_weighting, d.min_snr_gamma, d.guidance_scale, d.uncond_quality, d.ddim_eta) == ("min_snr", 5.0, 2.5, "medium", 1.0)
    assert cfg.preset == "xl" and cfg.model["adaln"] == "single" and tuple(cfg.model["patch_size"]) == (4, 1)


def test_list_presets_prints_parameter_counts(capsys):
    from model.train import cli

    assert cli(["--list-presets"]) == 0
    out = capsys.readouterr().out
    assert "xl" in out and "900.7M" in out and "675.1M" in out


def test_compile_blocks_compiles_every_block_in_place_and_computes_the_same():
    model = _tiny()
    x, t, q, y, m = _inputs()
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(3)
    eager = model(x, t, q, y, m, mask_ratio=0.5)
    torch._dynamo.reset()
    model.compile_blocks(backend="eager")  # graph capture only: inductor would take minutes on a CPU
    assert all(b._compiled_call_impl is not None for b in model.blocks())
    assert [n for n, _ in model.named_parameters()] == names  # checkpoints and EMA keep the plain names
    torch.manual_seed(3)
    torch.testing.assert_close(model(x, t, q, y, m, mask_ratio=0.5), eager)


def test_compiled_blocks_cover_every_mask_bucket_without_falling_back_to_eager():
    """A training run sees 8 visible-token counts (mask_ratio_buckets), a smaller last batch,
    then the full length in validation: more graphs of the one block code object than torch's
    default recompile limit (8); past the limit a block runs eagerly with only a log line."""
    from torch._dynamo.utils import counters

    model = _tiny().train()
    x, t, q, y, m = _inputs()
    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend="eager")
    for b in range(8):
        model(x, t, q, y, m, mask_ratio=model.mask_ratio_at((b + 0.5) / 8, buckets=8)).sum().backward()
    last = [v[:1] for v in (x, t, q, y, m)]  # the epoch's last, smaller batch
    model(*last, mask_ratio=model.mask_ratio_at(0.5, buckets=8)).sum().backward()
    with torch.no_grad():
        model.eval()(x, t, q, y, m)
    assert not [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]
    assert counters["stats"]["unique_graphs"] >= 5  # skip / no skip, encoder / decoder lengths: really compiled
