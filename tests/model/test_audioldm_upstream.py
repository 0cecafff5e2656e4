"""model/audioldm.py computes what haoheliu/AudioLDM computes on the same weights.

The upstream modules come from the `audioldm` PyPI package (installed `--no-deps` by the
Makefile, requirements/dev-nodeps.txt): `variational_autoencoder/` (AutoencoderKL, Encoder,
Decoder, DiagonalGaussianDistribution) and `hifigan/` (Generator). Its package `__init__` pulls
the whole text-to-audio pipeline (downloads, gradio-era pins), so the test loads only those
module files, under their own names, with `audioldm` and `audioldm.latent_diffusion` as bare
packages and a stand-in `audioldm.utils` (its one import there is a config helper the
autoencoder never calls). Random weights are saved the way upstream checkpoints hold them
(`torch.save({"state_dict": ...})` of the LatentDiffusion, the autoencoder and its vocoder under
`first_stage_model.`; a HiFi-GAN training file with weight norm under `generator`), read back
with mosaiq's loaders, and both implementations run on the same input.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from model.audioldm import AE_PREFIX, SCALE_KEY, AudioLDMVAEConfig, HiFiGANConfig, load_autoencoder, load_vocoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-5  # of the output's scale (its largest magnitude)

# AudioLDM's released autoencoder (audioldm-s-full: ddconfig and embed_dim) and its vocoder
REAL_VAE = AudioLDMVAEConfig()
REAL_VOC = HiFiGANConfig()
TINY_VAE = AudioLDMVAEConfig(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=3)
TINY_VOC = HiFiGANConfig(num_mels=16, upsample_rates=(4, 2), upsample_kernel_sizes=(8, 4), upsample_initial_channel=32,
                         resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3, 5), (1, 2, 3)))


@pytest.fixture(scope="module")
def upstream():
    """The upstream `variational_autoencoder.autoencoder` and `hifigan` modules (see the module
    docstring); sys.modules is left as it was afterwards."""
    for name in ("audioldm", "einops"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (`make install` installs the upstream AudioLDM package with --no-deps)")
    root = Path(importlib.util.find_spec("audioldm").submodule_search_locations[0])
    saved = {k: v for k, v in sys.modules.items() if k == "audioldm" or k.startswith("audioldm.")}
    for k in saved:
        del sys.modules[k]

    def package(name: str, folder: Path) -> None:
        mod = types.ModuleType(name)
        mod.__path__ = [str(folder)]
        sys.modules[name] = mod

    def not_called(*args, **kwargs):
        raise AssertionError("audioldm.utils.instantiate_from_config is not part of the compared code")

    try:
        package("audioldm", root)
        package("audioldm.latent_diffusion", root / "latent_diffusion")
        sys.modules["audioldm.utils"] = types.SimpleNamespace(instantiate_from_config=not_called)
        ae = importlib.import_module("audioldm.variational_autoencoder.autoencoder")
        hifigan = importlib.import_module("audioldm.hifigan")
        yield types.SimpleNamespace(AutoencoderKL=ae.AutoencoderKL, Generator=hifigan.Generator, AttrDict=hifigan.AttrDict)
    finally:
        for k in [k for k in sys.modules if k == "audioldm" or k.startswith("audioldm.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def _ddconfig(cfg: AudioLDMVAEConfig) -> dict:
    """AudioLDM's `ddconfig` for a mosaiq config (audioldm-s-full.yaml's keys)."""
    return {"double_z": True, "z_channels": cfg.z_channels, "resolution": 256, "downsample_time": False,
            "in_channels": 1, "out_ch": 1, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult),
            "num_res_blocks": cfg.num_res_blocks, "attn_resolutions": [], "dropout": 0.0}


def _hifigan_config(cfg: HiFiGANConfig) -> dict:
    """The `h` AudioLDM's hifigan.Generator reads (hifigan/utilities.py's HIFIGAN_16K_64 keys)."""
    return {"resblock": "1", "num_mels": cfg.num_mels, "upsample_rates": list(cfg.upsample_rates),
            "upsample_kernel_sizes": list(cfg.upsample_kernel_sizes), "upsample_initial_channel": cfg.upsample_initial_channel,
            "resblock_kernel_sizes": list(cfg.resblock_kernel_sizes),
            "resblock_dilation_sizes": [list(d) for d in cfg.resblock_dilation_sizes]}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Seeded random weights of a trained network's scale: convolutions ~ N(0, 1/fan_in) per
    output, norms' scale near 1, biases small (upstream's HiFi-GAN init, N(0, 0.01), would give
    a near-silent vocoder whose comparison proves little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("weight_g"):  # weight norm's magnitude: that of a N(0, 1/fan_in) weight
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() > 1:
                fan_in = p[0].numel() if not isinstance(_owner(module, name), torch.nn.ConvTranspose1d) else p.shape[0] * p.shape[2]
                p.copy_(noise / math.sqrt(fan_in))
            elif name.endswith("weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.05 * noise)


def _owner(module: torch.nn.Module, param_name: str) -> torch.nn.Module:
    return module.get_submodule(param_name.rsplit(".", 1)[0])


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = want.abs().max().item()
    assert scale > 1e-3, f"{what}: the upstream output is ~0 ({scale}); the comparison would prove nothing"
    err = (got - want).abs().max().item()
    assert err <= RTOL * scale, f"{what}: max |mosaiq - upstream| = {err:.3g}, output scale {scale:.3g}"


def _upstream_checkpoint(upstream, vae: AudioLDMVAEConfig, seed: int, path: Path, scale: float = 0.75):
    """An upstream AutoencoderKL (with the released vocoder it builds) of random weights, saved
    as the released `.ckpt` holds it: the LatentDiffusion's state_dict under "state_dict",
    the autoencoder and vocoder under `first_stage_model.`, the latent scale as `scale_factor`."""
    torch.manual_seed(seed)
    ae = upstream.AutoencoderKL(ddconfig=_ddconfig(vae), embed_dim=vae.embed_dim)
    _randomize(ae, seed)
    with torch.no_grad():  # one log-variance channel beyond the posterior's clamp (20): the clamp is compared too
        ae.quant_conv.bias[vae.embed_dim] += 24.0
    ae.eval()
    state = {AE_PREFIX + k: v for k, v in ae.state_dict().items()}
    state[SCALE_KEY] = torch.tensor(scale)
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0}, path)
    return ae


@pytest.mark.parametrize("vae, mel_shape", [(REAL_VAE, (1, 1, 64, 16)), (TINY_VAE, (2, 1, 48, 32))],
                         ids=["audioldm-s-full", "tiny"])
@torch.no_grad()
def test_autoencoder_matches_upstream(upstream, tmp_path, vae, mel_shape):
    ref = _upstream_checkpoint(upstream, vae, seed=1, path=tmp_path / "audioldm.ckpt")
    ours, scale = load_autoencoder(tmp_path / "audioldm.ckpt", vae)
    assert scale == pytest.approx(0.75)
    mel = torch.randn(mel_shape, generator=torch.Generator().manual_seed(2)) * 2.0 - 5.0  # natural-log mel levels
    posterior = ref.encode(mel)
    _close(ours.encode(mel), posterior.mode(), "posterior mean (mode)")
    torch.manual_seed(3)
    want = posterior.sample()
    torch.manual_seed(3)
    got = ours.encode(mel, sample=True)
    for c in range(vae.embed_dim):  # per channel: the first one's std is e^10
        _close(got[:, c], want[:, c], f"posterior sample, channel {c}")
    z = posterior.mode()
    _close(ours.decode(z), ref.decode(z), "decode")


@torch.no_grad()
def test_vocoder_of_a_released_checkpoint_matches_upstream(upstream, tmp_path):
    """The full-size 16 kHz / 64-mel HiFi-GAN that upstream's AutoencoderKL builds and keeps
    under `first_stage_model.vocoder.` (weight norm removed)."""
    ref = _upstream_checkpoint(upstream, AudioLDMVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1), seed=4,
                               path=tmp_path / "audioldm.ckpt")
    ours = load_vocoder(tmp_path / "audioldm.ckpt", REAL_VOC)
    mel = torch.randn(2, 64, 12, generator=torch.Generator().manual_seed(5)) * 2.0 - 5.0  # (N, mels, frames)
    want = ref.vocoder(mel)  # (N, 1, about 160 frames: the transposed convolutions add a few samples)
    assert want.shape[:2] == (2, 1) and want.shape[2] >= 160 * 12
    assert 0.05 < want.std().item() and want.abs().max().item() < 0.999  # neither silent nor saturated
    _close(ours(mel), want, "vocoder (released size)")


@torch.no_grad()
def test_vocoder_of_a_weight_normed_generator_file_matches_upstream(upstream, tmp_path):
    """A HiFi-GAN training file (`g_*`: {"generator": state_dict} with weight_g / weight_v)."""
    torch.manual_seed(6)
    ref = upstream.Generator(upstream.AttrDict(_hifigan_config(TINY_VOC)))
    _randomize(ref, 6)
    ref.eval()
    assert any(k.endswith("weight_g") for k in ref.state_dict())
    torch.save({"generator": ref.state_dict()}, tmp_path / "g_00100000")
    ours = load_vocoder(tmp_path / "g_00100000", TINY_VOC)
    mel = torch.randn(1, 16, 20, generator=torch.Generator().manual_seed(7)) * 2.0 - 5.0
    want = ref(mel)  # weight norm applied on the fly, as upstream trains
    assert 0.05 < want.std().item()
    _close(ours(mel), want, "vocoder (weight norm)")
    ref.remove_weight_norm()  # what upstream does before inference
    _close(ours(mel), ref(mel), "vocoder (weight norm removed)")
