"""QA-MDT: a quality-aware masked diffusion transformer over (C, T, F) audio latents.

Reads like DiT's models.py: embedders, attention with 2-D RoPE, the block, patchify, the
model, and the preset registry. The structure follows QA-MDT (Li et al. 2024) and MDT
(Gao et al. 2023): the quality level is a prefix token present at every stage; in training
the encoder sees only visible tokens, a side interpolator fills masked positions from a
learned mask token, and the decoder sees all tokens. Depth split as the official code:
(depth - decode_layers) // 2 encoder "in" blocks whose outputs are long-skipped into as many
encoder "out" blocks, then `decode_layers` decoder blocks that each take a long skip from the
embedded input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from schemas.tables import NUM_QUALITY_LEVELS


@dataclass(frozen=True)
class QAMDTConfig:
    """Architecture. Size fields come from a preset in `PRESETS`; the rest are shared."""

    in_channels: int = 1  # latent channels (1 for the mel itself, 8 for the KL autoencoder)
    freq_size: int = 64  # latent frequency bins F'; the time length may vary
    patch_size: tuple[int, int] = (16, 4)  # (time, freq)
    overlap: tuple[int, int] = (0, 0)  # (time, freq); overlapping patches are averaged on unpatchify
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    decode_layers: int = 8
    mlp_ratio: float = 4.0
    cond_dim: int = 1024  # hidden size of the frozen text encoder
    mask_ratio: float = 0.30  # training mask ratio is mask_ratio + U(0, mask_ratio_jitter)
    mask_ratio_jitter: float = 0.20
    rope_theta: float = 10_000.0
    # "zero": DiT's adaLN-Zero, a (6D) modulation MLP in every block; "single": one shared
    # timestep MLP plus a learned (6, D) table per block (PixArt-alpha's adaLN-single, as the
    # official QA-MDT code), about 234M fewer parameters at xl
    adaln: Literal["zero", "single"] = "zero"
    grad_checkpoint: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} must be a multiple of 4 (2-D RoPE)")
        if not 0 < self.decode_layers < self.depth or (self.depth - self.decode_layers) % 2:
            raise ValueError(f"depth {self.depth} - decode_layers {self.decode_layers} must be positive and even")
        for p, o in zip(self.patch_size, self.overlap):
            if not 0 <= o < p:
                raise ValueError(f"overlap {self.overlap} must be >= 0 and smaller than patch_size {self.patch_size}")
        if self.adaln not in ("zero", "single"):
            raise ValueError(f"adaln must be 'zero' or 'single', got {self.adaln!r}")
        if not (0 <= self.mask_ratio and 0 <= self.mask_ratio_jitter and self.mask_ratio + self.mask_ratio_jitter < 1):
            raise ValueError(f"mask_ratio {self.mask_ratio} + jitter {self.mask_ratio_jitter} must lie in [0, 1)")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                      Embedding layers for timesteps                           #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> vectors (sinusoidal features, then an MLP)."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)  # (H,)
        args = t.float()[:, None] * freqs[None]  # (N, H)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (N, D)


#################################################################################
#                        Attention with 2-D rotary positions                    #
#################################################################################


def rope_tables(pos: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token (time, freq) positions (N, L, 2) -> cos, sin (N, 1, L, head_dim).

    The first half of each head rotates with the time index, the second half with the
    frequency index. A position of (-1, -1) marks a token without position (the quality
    prefix): its rotation is the identity.
    """
    quarter = head_dim // 4
    inv = theta ** (-torch.arange(quarter, device=pos.device, dtype=torch.float32) / quarter)  # (Q,)
    angles = pos.float().unsqueeze(-1) * inv  # (N, L, 2, Q)
    angles = torch.where(pos.unsqueeze(-1) < 0, torch.zeros_like(angles), angles)  # (N, L, 2, Q)
    angles = torch.cat([angles, angles], dim=-1).flatten(2)  # (N, L, 4Q): [t, t, f, f]
    return torch.cos(angles).unsqueeze(1), torch.sin(angles).unsqueeze(1)  # (N, 1, L, hd) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (N, H, L, hd) by the tables; halves of each axis chunk are the rotation pairs."""
    chunks = x.unflatten(-1, (2, 2, -1))  # (N, H, L, axis, half, Q)
    rotated = torch.stack([-chunks[..., 1, :], chunks[..., 0, :]], dim=-2).flatten(-3)  # (N, H, L, hd)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)  # (N, H, L, hd)


class SelfAttention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on queries and keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (N, H, L, hd) each
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (N, H, L, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, hd)
        return self.proj(out.transpose(1, 2).flatten(2))  # (N, L, D)


class CrossAttention(nn.Module):
    """Tokens attend to the text encoder's hidden states (padding masked out)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (N, H, L, hd)
        k, v = self.kv(y).unflatten(-1, (2, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # (N, H, S, hd) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=y_mask[:, None, None, :])  # (N, H, L, hd)
        return self.proj(out.transpose(1, 2).flatten(2))  # (N, L, D)


#################################################################################
#                                 Core block                                     #
#################################################################################


class QAMDTBlock(nn.Module):
    """Self-attention, cross-attention, MLP; adaLN-Zero or adaLN-single from the timestep; optional long skip."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, skip: bool = False, adaln: str = "zero"):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        if adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Six (N, D) shift/scale/gate vectors from c: (N, D) for adaLN-Zero, (N, 6, D) shared for adaLN-single."""
        if c.dim() == 2:
            return self.adaLN_modulation(c).chunk(6, dim=1)  # (N, D) each
        return (self.scale_shift_table[None] + c).unbind(1)  # (N, D) each

    def forward(self, x, c, y, y_mask, rope, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (N, L, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)  # (N, D) each
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)  # (N, L, D)
        x = x + self.cross_attn(self.norm_cross(x), y, y_mask)  # (N, L, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, L, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from each token to its patch."""

    def __init__(self, dim: int, patch_dim: int, adaln: str = "zero"):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_dim)
        if adaln == "zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """c: the (N, D) timestep embedding in both adaLN variants."""
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        else:
            shift, scale = (self.scale_shift_table[None] + c.unsqueeze(1)).unbind(1)  # (N, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, L, C*pt*pf)


#################################################################################
#                         Patchify with optional overlap                         #
#################################################################################


class Patchifier(nn.Module):
    """(N, C, T, F) <-> (N, L, C*pt*pf) patches on a (T', F') grid; overlaps averaged back."""

    def __init__(self, patch_size: tuple[int, int], overlap: tuple[int, int]):
        super().__init__()
        self.patch = tuple(patch_size)
        self.stride = tuple(p - o for p, o in zip(patch_size, overlap))

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """Patches along (time, freq) for an input of `size`, after padding to fit."""
        return tuple(max(0, math.ceil((n - p) / s)) + 1 for n, p, s in zip(size, self.patch, self.stride))

    def _padded(self, size):
        return tuple((g - 1) * s + p for g, s, p in zip(self.grid(size), self.stride, self.patch))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        pt, pf = self._padded(x.shape[-2:])
        x = F.pad(x, (0, pf - x.shape[-1], 0, pt - x.shape[-2]))  # (N, C, Tp, Fp)
        cols = F.unfold(x, kernel_size=self.patch, stride=self.stride)  # (N, C*pt*pf, L)
        return cols.transpose(1, 2)  # (N, L, C*pt*pf)

    def unpatchify(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        padded = self._padded(size)
        cols = tokens.transpose(1, 2)  # (N, C*pt*pf, L)
        summed = F.fold(cols, padded, kernel_size=self.patch, stride=self.stride)  # (N, C, Tp, Fp)
        ones = torch.ones(1, cols.shape[1], cols.shape[2], device=cols.device, dtype=cols.dtype)  # (1, C*pt*pf, L)
        count = F.fold(ones, padded, kernel_size=self.patch, stride=self.stride)  # (1, C, Tp, Fp)
        return (summed / count)[..., : size[0], : size[1]]  # (N, C, T, F)

    def positions(self, size: tuple[int, int], device=None) -> torch.Tensor:
        gt, gf = self.grid(size)
        t = torch.arange(gt, device=device).repeat_interleave(gf)  # (L,)
        f = torch.arange(gf, device=device).repeat(gt)  # (L,)
        return torch.stack([t, f], dim=-1)  # (L, 2)


#################################################################################
#                                  QA-MDT                                        #
#################################################################################


class QAMDT(nn.Module):
    """Masked diffusion transformer with a quality prefix token and text cross-attention."""

    def __init__(self, cfg: QAMDTConfig):
        super().__init__()
        self.cfg = cfg
        d, h, r = cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio
        self.patchifier = Patchifier(cfg.patch_size, cfg.overlap)
        patch_dim = cfg.in_channels * cfg.patch_size[0] * cfg.patch_size[1]
        self.x_embedder = nn.Linear(patch_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = nn.Linear(cfg.cond_dim, d)
        self.quality_embedder = nn.Embedding(NUM_QUALITY_LEVELS, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        a = cfg.adaln
        # adaLN-single: one timestep MLP whose (N, 6D) output every block adds to its own table
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d)) if a == "single" else None
        half = (cfg.depth - cfg.decode_layers) // 2
        self.en_inblocks = nn.ModuleList([QAMDTBlock(d, h, r, adaln=a) for _ in range(half)])
        self.en_outblocks = nn.ModuleList([QAMDTBlock(d, h, r, skip=True, adaln=a) for _ in range(half)])
        self.sideblock = QAMDTBlock(d, h, r, adaln=a)
        self.de_blocks = nn.ModuleList([QAMDTBlock(d, h, r, skip=True, adaln=a) for _ in range(cfg.decode_layers)])
        self.final_layer = FinalLayer(d, patch_dim, adaln=a)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.quality_embedder.weight, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        # adaLN-Zero: every residual branch starts closed, and so does the output; adaLN-single
        # starts from its tables (the shared MLP's output layer at zero), as PixArt-alpha
        modulators = [b.adaLN_modulation[-1] for b in self.blocks()] if self.t_block is None else [self.t_block[-1]]
        if self.t_block is None:
            modulators.append(self.final_layer.adaLN_modulation[-1])
        for lin in modulators:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for block in self.blocks():
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def blocks(self) -> list[QAMDTBlock]:
        return [*self.en_inblocks, *self.en_outblocks, self.sideblock, *self.de_blocks]

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each transformer block in place (regional compilation): every block runs
        the same code, so a handful of graphs (with or without a long skip, encoder or decoder
        length) serve all of them, and compiling takes about as long for xl as for tiny; the
        whole model as one graph took over two minutes for xl on an H200. Parameter names
        (checkpoints, EMA) stay as they are. The rest of the forward (embedders, gathers, the
        final layer) runs eagerly; it is a small share of the FLOPs.

        All blocks share one code object, and with bucketed mask ratios a training run makes 8
        graphs of it (static and then dynamic lengths, with and without the skip), torch's
        default recompile limit; one more shape (a smaller batch) and a block would fall back
        to eager with only a log line, so the limit is raised to 32."""
        import torch._dynamo.config as dynamo_config

        name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, name, max(getattr(dynamo_config, name), 32))
        for block in self.blocks():
            block.compile(backend=backend)

    def sample_mask_ratio(self) -> float:
        """A training mask ratio: mask_ratio + U(0, jitter), from torch's global RNG."""
        return self.mask_ratio_at(torch.rand(()).item())

    def mask_ratio_at(self, u: float, buckets: int = 0) -> float:
        """The training mask ratio for a uniform draw u in [0, 1): mask_ratio + jitter * u. With
        `buckets` > 0, u is snapped to the centre of one of that many bins, so the visible-token
        count takes few values (a compiled model then sees few shapes)."""
        if buckets > 0:
            u = (min(int(u * buckets), buckets - 1) + 0.5) / buckets
        return self.cfg.mask_ratio + self.cfg.mask_ratio_jitter * u

    def _run(self, block, *args, **kwargs):
        if self.cfg.grad_checkpoint and self.training:
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    def forward(self, x, t, quality, text, text_mask, mask_ratio: float | None = None):
        """Predict the noise.

        x: (N, C, T, F) noisy latent; t: (N,) timesteps; quality: (N,) levels 1..5;
        text: (N, S, cond_dim) encoder states; text_mask: (N, S) bool, True = real token.
        mask_ratio: None runs all tokens everywhere (sampling); a float in [0, 1) runs the
        masked training path (encoder on visible tokens, side interpolator, decoder on all).
        """
        N, _, T, Fq = x.shape
        d = self.cfg.hidden_size
        head_dim = d // self.cfg.num_heads
        tokens = self.patchifier.patchify(x)  # (N, L, C*pt*pf)
        L = tokens.shape[1]
        h = self.x_embedder(tokens)  # (N, L, D)
        c = self.t_embedder(t)  # (N, D)
        cb = c if self.t_block is None else self.t_block(c).unflatten(1, (6, d))  # (N, D) or (N, 6, D): what blocks get
        y = self.y_embedder(text)  # (N, S, D)
        y_mask = text_mask.bool().clone()  # (N, S)
        y_mask[:, 0] = True  # an empty prompt still has one key to attend to
        q = self.quality_embedder(quality.long() - 1).unsqueeze(1)  # (N, 1, D)
        h = torch.cat([q, h], dim=1)  # (N, 1+L, D)
        input_skip = h  # (N, 1+L, D)
        prefix_pos = torch.full((N, 1, 2), -1, device=x.device, dtype=torch.long)  # (N, 1, 2)
        pos = self.patchifier.positions((T, Fq), x.device).expand(N, L, 2)  # (N, L, 2)
        rope_all = rope_tables(torch.cat([prefix_pos, pos], 1), head_dim, self.cfg.rope_theta)  # (N, 1, 1+L, hd) x2

        if mask_ratio is not None:
            keep = int(L * (1 - mask_ratio))
            ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)  # (N, L)
            ids_keep = ids_shuffle[:, :keep]  # (N, K)
            visible = torch.gather(h[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (N, K, D)
            h = torch.cat([h[:, :1], visible], dim=1)  # (N, 1+K, D)
            pos_keep = torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, 2))  # (N, K, 2)
            rope = rope_tables(torch.cat([prefix_pos, pos_keep], 1), head_dim, self.cfg.rope_theta)  # (N, 1, 1+K, hd) x2
        else:
            rope = rope_all

        skips = []
        for block in self.en_inblocks:
            h = self._run(block, h, cb, y, y_mask, rope)  # (N, 1+K, D)
            skips.append(h)
        for block in self.en_outblocks:
            h = self._run(block, h, cb, y, y_mask, rope, skip=skips.pop())  # (N, 1+K, D)

        if mask_ratio is not None:
            h = self.side_interpolate(h, ids_keep, L, cb, y, y_mask, rope_all)  # (N, 1+L, D)

        for block in self.de_blocks:
            h = self._run(block, h, cb, y, y_mask, rope_all, skip=input_skip)  # (N, 1+L, D)
        h = h[:, 1:]  # (N, L, D): the quality token is stripped before the final layer
        out = self.final_layer(h, c)  # (N, L, C*pt*pf)
        return self.patchifier.unpatchify(out, (T, Fq))  # (N, C, T, F)

    def side_interpolate(self, h, ids_keep, L, c, y, y_mask, rope_all):
        """Scatter visible tokens back, fill masked places with the mask token, predict them."""
        N, _, d = h.shape
        full = self.mask_token.to(h.dtype).expand(N, L, d).clone()  # (N, L, D)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, d), h[:, 1:])  # (N, L, D)
        before = torch.cat([h[:, :1], full], dim=1)  # (N, 1+L, D)
        after = self._run(self.sideblock, before, c, y, y_mask, rope_all)  # (N, 1+L, D)
        # 1 where the interpolator's output is used: masked places only. The quality token and
        # the visible tokens pass unchanged (the official code also overwrites the quality token
        # here; keeping it makes mask ratio 0 identical to the unmasked path)
        masked = torch.ones(N, 1 + L, 1, device=h.device, dtype=h.dtype)  # (N, 1+L, 1)
        masked[:, 0] = 0.0
        masked[:, 1:].scatter_(1, ids_keep.unsqueeze(-1), 0.0)
        return after * masked + before * (1 - masked)  # (N, 1+L, D)


#################################################################################
#                                 Presets                                        #
#################################################################################

# size fields only; everything else keeps the QAMDTConfig default or comes from the job config
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, depth=4, num_heads=4, decode_layers=2),  # trains on a CPU in seconds
    "small": dict(hidden_size=384, depth=12, num_heads=6, decode_layers=4),
    "base": dict(hidden_size=768, depth=12, num_heads=12, decode_layers=4),
    "large": dict(hidden_size=1024, depth=24, num_heads=16, decode_layers=6),
    "xl": dict(hidden_size=1152, depth=28, num_heads=16, decode_layers=8),  # the paper's model
}


def model_config(preset: str, **overrides) -> QAMDTConfig:
    """The config of a preset, with any field overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets are {sorted(PRESETS)}")
    return replace(QAMDTConfig(**PRESETS[preset]), **overrides)


def build_model(cfg: QAMDTConfig) -> QAMDT:
    return QAMDT(cfg)


# the paper's representation: 8-channel KL latent of 256 x 16, patch 4 x 1, FLAN-T5-large states
PAPER_SHAPES = dict(in_channels=8, freq_size=16, patch_size=(4, 1), cond_dim=1024)


def parameter_count(cfg: QAMDTConfig) -> int:
    """Parameters of the model `cfg` describes (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = QAMDT(cfg)
    return sum(p.numel() for p in model.parameters())


def preset_table(**overrides) -> list[dict]:
    """Every preset with its size fields and parameter counts (adaLN-Zero and adaLN-single) at
    the paper's shapes, or at `overrides`."""
    rows = []
    for name, size in PRESETS.items():
        shapes = {**PAPER_SHAPES, **overrides}
        rows.append({
            "preset": name, **size,
            "params_adaln_zero": parameter_count(model_config(name, **{**shapes, "adaln": "zero"})),
            "params_adaln_single": parameter_count(model_config(name, **{**shapes, "adaln": "single"})),
        })
    return rows
