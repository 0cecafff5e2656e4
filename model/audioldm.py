"""AudioLDM's KL autoencoder and 16 kHz HiFi-GAN, with the module and parameter names of its
released checkpoints, so those load strictly from local files.

Written from the structure of haoheliu/AudioLDM (`variational_autoencoder/modules.py`,
`autoencoder.py`, `hifigan/models.py`); no code is taken from it. The released checkpoints
(`audioldm-s-full.ckpt` and QA-MDT's) keep the autoencoder under `first_stage_model.`, its
vocoder under `first_stage_model.vocoder.` (weight norm already removed) and the latent scale
as `scale_factor`. Shapes: log-mel (N, 1, 1024, 64) <-> latent (N, 8, 256, 16); the vocoder
maps (N, 64, T) natural-log mel to (N, 160 T + 32) samples at 16 kHz (its transposed
convolutions add 32, as upstream's do). tests/model/test_audioldm_upstream.py checks both
against the upstream code on the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

AE_PREFIX = "first_stage_model."
VOCODER_PREFIX = "first_stage_model.vocoder."
SCALE_KEY = "scale_factor"


@dataclass(frozen=True)
class AudioLDMVAEConfig:
    """The `ddconfig` and `embed_dim` of AudioLDM's AutoencoderKL (defaults: the released one)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 8
    embed_dim: int = 8
    num_groups: int = 32  # GroupNorm groups (AudioLDM: 32; tiny test configs use fewer channels)


@dataclass(frozen=True)
class HiFiGANConfig:
    """AudioLDM's 16 kHz / 64-mel HiFi-GAN V1 generator (upsampling 5 x 4 x 2 x 2 x 2 = hop 160)."""

    num_mels: int = 64
    upsample_rates: tuple[int, ...] = (5, 4, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16, 8, 4, 4)
    upsample_initial_channel: int = 1024
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))

    @property
    def hop_length(self) -> int:
        hop = 1
        for r in self.upsample_rates:
            hop *= r
        return hop


#################################################################################
#                              KL autoencoder                                    #
#################################################################################


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (N, cout, H, W)
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x  # (N, cout, H, W)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with 1x1 convolutions q, k, v, proj_out."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)  # (N, C, H, W)
        q, k, v = (m(y).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v))  # (N, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, 1, HW, C)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))  # (N, C, H, W)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one row and column at the far end."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (N, C, 2H, 2W)


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList()  # AudioLDM: no attention at any resolution (attn_resolutions [])
    if resample is not None:
        setattr(level, name, resample)
    return level


def _middle(c: int, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)
    return mid


class Encoder(nn.Module):
    """mel (N, 1, T, F) -> moments (N, 2 z, T/2^k, F/2^k)."""

    def __init__(self, cfg: AudioLDMVAEConfig):
        super().__init__()
        g, chans = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(1, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for i, c in enumerate(chans):
            blocks = [ResnetBlock(cin if j == 0 else c, c, g) for j in range(cfg.num_res_blocks)]
            self.down.append(_level(blocks, Downsample(c) if i < len(chans) - 1 else None, "downsample"))
            cin = c
        self.mid = _middle(cin, g)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (N, ch, T, F)
        for level in self.down:
            for block in level.block:
                h = block(h)  # (N, c, T', F')
            if hasattr(level, "downsample"):
                h = level.downsample(h)  # (N, c, T'/2, F'/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (N, c, T', F')
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 2z, T', F')


class Decoder(nn.Module):
    """latent (N, z, T', F') -> mel (N, 1, T' 2^k, F' 2^k)."""

    def __init__(self, cfg: AudioLDMVAEConfig):
        super().__init__()
        g, chans = cfg.num_groups, [cfg.ch * m for m in cfg.ch_mult]
        cin = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _middle(cin, g)
        levels = []
        for i in reversed(range(len(chans))):  # built deepest first, stored shallowest first
            c = chans[i]
            blocks = [ResnetBlock(cin if j == 0 else c, c, g) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, _level(blocks, Upsample(c) if i > 0 else None, "upsample"))
            cin = c
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 1, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))  # (N, c, T', F')
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)  # (N, c, T', F')
            if hasattr(level, "upsample"):
                h = level.upsample(h)  # (N, c, 2T', 2F')
        return self.conv_out(F.silu(self.norm_out(h)))  # (N, 1, T, F)


class AudioLDMAutoencoder(nn.Module):
    """AudioLDM's AutoencoderKL without its vocoder: log-mel (N, 1, T, F) <-> latent (N, 8, T/4, F/4).

    Takes the natural-log mel as AudioLDM computes it (not normalised). Latents are not scaled
    here; the representation applies the measured scale (`scale_by_std`)."""

    takes_log_mel = True

    def __init__(self, cfg: AudioLDMVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        k = 2 ** (len(cfg.ch_mult) - 1)
        self.downsample = (k, k)
        self.latent_channels = cfg.embed_dim

    def encode(self, mel: torch.Tensor, sample: bool = False) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(mel))  # (N, 2e, T', F')
        mean, logvar = moments.chunk(2, dim=1)  # (N, e, T', F') each
        if not sample:
            return mean
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean)  # (N, e, T', F')

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))  # (N, 1, T, F)


#################################################################################
#                                  HiFi-GAN                                      #
#################################################################################

LRELU_SLOPE = 0.1


class HiFiResBlock(nn.Module):
    """Three pairs of (dilated conv, conv), each pair a residual step (HiFi-GAN ResBlock1)."""

    def __init__(self, c: int, k: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList([nn.Conv1d(c, c, k, dilation=d, padding=(k * d - d) // 2) for d in dilations])
        self.convs2 = nn.ModuleList([nn.Conv1d(c, c, k, padding=(k - 1) // 2) for _ in dilations])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))  # (N, C, S)
        return x


class HiFiGANGenerator(nn.Module):
    """log-mel (N, num_mels, T) -> wave (N, 1, about hop T) in [-1, 1]; weight norm removed (plain weights)."""

    def __init__(self, cfg: HiFiGANConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, c0, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c0 // 2**i, c0 // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            HiFiResBlock(c0 // 2 ** (i + 1), k, d)
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        self.conv_post = nn.Conv1d(c0 // 2 ** len(self.ups), 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        nk = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(mel)  # (N, C0, T)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))  # (N, C_i, about T * prod(rates[:i+1]))
            x = sum(self.resblocks[i * nk + j](x) for j in range(nk)) / nk  # (N, C_i, ...)
        return torch.tanh(self.conv_post(F.leaky_relu(x)))  # (N, 1, about hop T); slope 0.01 here, as upstream


#################################################################################
#                        Loading released checkpoints                            #
#################################################################################


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local safetensors file, or of a torch checkpoint read with weights_only=True
    (a Lightning `.ckpt`'s "state_dict", or a HiFi-GAN `g_*` file's "generator")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AudioLDM checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling error names the global that is not allowed
        raise ValueError(f"{path}: not loadable with weights_only=True (convert it to safetensors): {e}") from e
    for key in ("state_dict", "generator"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not all(torch.is_tensor(v) for v in raw.values()):
        raise ValueError(f"{path}: expected a mapping of tensors (or one under 'state_dict' / 'generator')")
    return raw


def _fold_weight_norm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weight_g` / `weight_v` pairs (a HiFi-GAN saved during training) -> plain `weight`
    (torch's weight norm: g * v / ||v|| over every dim but 0)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".weight_v"):
            base = k[: -len(".weight_v")]
            g = state[base + ".weight_g"]
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            out[base + ".weight"] = g * v / norm
        elif not k.endswith(".weight_g"):
            out[k] = v
    return out


def _group(state: dict[str, torch.Tensor], prefix: str, exclude: str | None = None) -> dict[str, torch.Tensor]:
    """The keys under `prefix`, prefix removed; the whole dict when no key has the prefix."""
    if not any(k.startswith(prefix) for k in state):
        return dict(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not (exclude and k.startswith(exclude))}


def load_autoencoder(path: str | Path, cfg: AudioLDMVAEConfig) -> tuple[AudioLDMAutoencoder, float | None]:
    """The autoencoder from a released checkpoint (`first_stage_model.*`) or a bare state dict,
    loaded strictly; also the checkpoint's `scale_factor` when it has one."""
    state = read_state_dict(path)
    ae = AudioLDMAutoencoder(cfg)
    group = _group(state, AE_PREFIX, exclude=VOCODER_PREFIX)
    group = {k: v for k, v in group.items() if not k.startswith("vocoder.") and k != SCALE_KEY}
    _load_strict(ae, group, path, "autoencoder")
    scale = state.get(SCALE_KEY)
    return ae.eval().requires_grad_(False), (float(scale) if scale is not None else None)


def load_vocoder(path: str | Path, cfg: HiFiGANConfig) -> HiFiGANGenerator:
    """The HiFi-GAN from a released AudioLDM checkpoint (`first_stage_model.vocoder.*`) or a
    generator state dict (weight-normed or not), loaded strictly."""
    state = _fold_weight_norm(_group(read_state_dict(path), VOCODER_PREFIX))
    voc = HiFiGANGenerator(cfg)
    _load_strict(voc, state, path, "vocoder")
    return voc.eval().requires_grad_(False)


def _load_strict(module: nn.Module, state: dict, path, what: str) -> None:
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = [k for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"{path}: not an AudioLDM {what} of this config: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {unexpected[:3]} ({len(unexpected)}), wrong shape {bad[:3]} ({len(bad)})"
        )
    module.load_state_dict(state, strict=True)
