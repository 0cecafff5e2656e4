"""Gaussian diffusion for QA-MDT: eps-prediction, DDPM training loss, DDIM sampling with
quality-aware guidance.

Guidance (QA-MDT): D = D(z, t, q_high, y) + w * (D(z, t, q_high, y) - D(z, t, q_uncond, empty)),
where q_uncond is the low (paper) or medium (official code) quality level. With w = 0 it is the
conditional prediction; it equals classic classifier-free guidance at scale 1 + w.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from schemas.tables import NUM_QUALITY_LEVELS

QUALITY_LOW = 1
QUALITY_MEDIUM = 3
QUALITY_HIGH = NUM_QUALITY_LEVELS
UNCOND_QUALITY = {"low": QUALITY_LOW, "medium": QUALITY_MEDIUM}


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule, training-time text dropout and sampler settings."""

    num_steps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    # "linear": betas linear in sqrt space, squared (what LDM/AudioLDM/QA-MDT call linear);
    # "linear_beta": betas linear themselves
    beta_schedule: Literal["linear", "linear_beta"] = "linear"
    uncond_prob: float = 0.1  # training: a prompt is replaced by the empty text with this probability
    masked_training: bool = True  # training runs the masked path (mask ratio from the model config)
    # "min_snr": each sample's eps-MSE weighted by min(SNR(t), gamma) / SNR(t) (Hang et al. 2023,
    # Min-SNR-gamma; the official QA-MDT code uses gamma 5); "none": plain MSE
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0
    ddim_steps: int = 200
    ddim_eta: float = 0.0
    guidance_scale: float = 3.5
    uncond_quality: Literal["low", "medium"] = "low"

    def __post_init__(self):
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if not 0 <= self.uncond_prob <= 1:
            raise ValueError(f"uncond_prob must lie in [0, 1], got {self.uncond_prob}")
        if not 1 <= self.ddim_steps <= self.num_steps:
            raise ValueError(f"ddim_steps must lie in [1, num_steps={self.num_steps}], got {self.ddim_steps}")
        if self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {self.min_snr_gamma}")
        if self.ddim_eta < 0:
            raise ValueError(f"ddim_eta must be >= 0, got {self.ddim_eta}")


def make_betas(cfg: DiffusionConfig) -> torch.Tensor:
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_steps, dtype=torch.float64) ** 2
    return torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_steps, dtype=torch.float64)


def drop_mask(n: int, prob: float, rng: random.Random) -> list[bool]:
    """Which of `n` prompts classifier-free training replaces by the empty text (each with
    probability `prob`; one draw per prompt, in order)."""
    return [rng.random() < prob for _ in range(n)]


def drop_prompts(prompts: list[str], prob: float, rng: random.Random) -> list[str]:
    """Replace each prompt by the empty text with probability `prob` (classifier-free training)."""
    return ["" if d else p for d, p in zip(drop_mask(len(prompts), prob, rng), prompts)]


# a denoiser: (z, t, quality, text, text_mask) -> eps
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GaussianDiffusion:
    """The schedule and everything computed from it (float64 tables, cast on use)."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.betas = make_betas(cfg)  # (S,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (S,)

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return table.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))  # (N, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self._at(self.alphas_cumprod, t, x0)  # (N, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise  # (N, C, T, F)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t (N,), float32."""
        ab = self.alphas_cumprod.to(t.device)[t]  # (N,)
        return (ab / (1 - ab)).float()  # (N,)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (N,): ones, or Min-SNR-gamma for eps-prediction."""
        if self.cfg.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)  # (N,)
        snr = self.snr(t)  # (N,)
        return snr.clamp(max=self.cfg.min_snr_gamma) / snr  # (N,)

    def training_loss(self, model, x0, quality, text, text_mask, mask_ratio: float | None = None) -> torch.Tensor:
        """Squared error of the predicted noise over all tokens (masked ones included), averaged
        per sample, weighted (`loss_weighting`) and averaged over the batch."""
        t = torch.randint(0, self.cfg.num_steps, (x0.shape[0],), device=x0.device)  # (N,)
        noise = torch.randn_like(x0)  # (N, C, T, F)
        xt = self.q_sample(x0, t, noise)  # (N, C, T, F)
        eps = model(xt, t, quality, text, text_mask, mask_ratio=mask_ratio)  # (N, C, T, F)
        per_sample = ((eps.float() - noise.float()) ** 2).flatten(1).mean(1)  # (N,)
        return torch.mean(self.loss_weights(t) * per_sample)

    @staticmethod
    def guided_eps(model: Denoiser, z, t, quality, text, text_mask, null_text, null_mask, w: float, uncond_quality: int):
        """QA-MDT guidance; the conditional and unconditional passes run as one batch."""
        if w == 0:
            return model(z, t, quality, text, text_mask)  # (N, C, T, F)
        n = z.shape[0]
        q_unc = torch.full_like(quality, uncond_quality)  # (N,)
        s = max(text.shape[1], null_text.shape[1])
        text, text_mask = _pad_to(text, text_mask, s)  # (N, S, E), (N, S)
        null_text, null_mask = _pad_to(null_text.expand(n, -1, -1), null_mask.expand(n, -1), s)  # (N, S, E), (N, S)
        eps = model(
            torch.cat([z, z]), torch.cat([t, t]), torch.cat([quality, q_unc]),
            torch.cat([text, null_text]), torch.cat([text_mask, null_mask]),
        )  # (2N, C, T, F)
        cond, uncond = eps.chunk(2)  # (N, C, T, F) each
        return cond + w * (cond - uncond)  # (N, C, T, F)

    @torch.no_grad()
    def ddim_sample(self, model: Denoiser, shape, quality, text, text_mask, null_text, null_mask,
                    generator: torch.Generator | None = None, steps: int | None = None,
                    w: float | None = None, uncond_quality: int | None = None, eta: float | None = None) -> torch.Tensor:
        """DDIM from pure noise to x0 (N, C, T, F); eta from the config unless given (0 = deterministic)."""
        steps = steps or self.cfg.ddim_steps
        eta = self.cfg.ddim_eta if eta is None else eta
        w = self.cfg.guidance_scale if w is None else w
        uq = UNCOND_QUALITY[self.cfg.uncond_quality] if uncond_quality is None else uncond_quality
        device = text.device
        ts = torch.linspace(self.cfg.num_steps - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        ab = self.alphas_cumprod
        z = torch.randn(shape, generator=generator, device="cpu").to(device)  # (N, C, T, F)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            a_t = ab[t].item()
            a_prev = ab[t_prev].item() if t_prev >= 0 else 1.0
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)  # (N,)
            eps = self.guided_eps(model, z, tt, quality, text, text_mask, null_text, null_mask, w, uq).float()  # (N, C, T, F)
            x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # (N, C, T, F)
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
            z = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps  # (N, C, T, F)
            if sigma > 0:
                z = z + sigma * torch.randn(shape, generator=generator, device="cpu").to(device)  # (N, C, T, F)
        return z


def _pad_to(states: torch.Tensor, mask: torch.Tensor, length: int):
    pad = length - states.shape[1]
    if pad == 0:
        return states, mask
    states = torch.nn.functional.pad(states, (0, 0, 0, pad))  # (N, length, E)
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)  # (N, length)
    return states, mask
