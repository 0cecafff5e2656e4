"""What the diffusion model sees: normalised log-mel, optionally through a KL autoencoder.

wave (N, S) at 16 kHz -> log-mel (N, 1, T, F) -> latent (N, C, T', F') and back:
latent -> mel (autoencoder decode) -> wave (Griffin-Lim on a CPU, or a neural vocoder from a
checkpoint). `autoencoder: audioldm` / `vocoder: audioldm` load AudioLDM's released VAE and
HiFi-GAN (model/audioldm.py) over AudioLDM's front end (`mel_scale: slaney`); the VAE takes
the natural-log mel itself, and its latents are multiplied by `latent_scale`, measured from
the first training batch when `scale_by_std` is set (as AudioLDM and QA-MDT do). The `RepresentationConfig` is written into every training checkpoint, so
`generate` rebuilds exactly the representation a model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from safetensors import safe_open
from safetensors.torch import save_file

from model.audioldm import AudioLDMVAEConfig, HiFiGANConfig, load_autoencoder, load_vocoder

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Hz, as QA-MDT
CLIP_SECONDS = 10.24  # as QA-MDT: 1024 mel frames at hop 160
KL_METADATA_KEY = "mosaiq.kl_autoencoder"
WAV_PEAK = 0.5  # AudioLDM's normalize_wav: peak of a normalised clip
WAV_EPS = 1e-8  # AudioLDM's normalize_wav: added to the peak (a silent clip stays silent)


@dataclass(frozen=True)
class MelConfig:
    """Log-mel front end (AudioLDM/QA-MDT STFT settings) and its normalisation.

    `mel_scale: slaney` is AudioLDM's filterbank (librosa's default: Slaney mel scale, Slaney
    area normalisation), which its VAE and HiFi-GAN were trained on; with it, AudioLDM's
    dataset statistics (-4.63, 2.74) normalise music to about zero mean and unit variance.
    "htk" (unnormalised HTK filters) is the older default, kept so existing runs reproduce.
    """

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    mel_scale: Literal["htk", "slaney"] = "htk"
    log_floor: float = 1e-5  # magnitude floor before the natural log
    norm_mean: float = -5.0  # (log-mel - mean) / std: roughly zero-mean, unit-std on music
    norm_std: float = 2.5
    # AudioLDM's `normalize_wav` before the mel: each clip minus its mean, divided by its peak,
    # times WAV_PEAK (0.5). Its VAE, HiFi-GAN and the (-4.63, 2.74) statistics were made on
    # clips normalised this way; off by default so existing runs reproduce.
    normalize_wav: bool = False


@dataclass(frozen=True)
class KLConfig:
    """A small AudioLDM-style KL autoencoder over the (1, T, F) mel image."""

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)  # one stride-2 downsampling per step after the first
    num_res_blocks: int = 1
    z_channels: int = 8
    scale_factor: float = 1.0  # latents are multiplied by this before diffusion (scale_by_std)


@dataclass(frozen=True)
class RepresentationConfig:
    """Mel front end, autoencoder (identity or KL from a checkpoint) and vocoder."""

    mel: MelConfig = field(default_factory=MelConfig)
    autoencoder: Literal["identity", "kl", "audioldm"] = "identity"
    # kl: safetensors written by `save_kl_autoencoder`; audioldm: AudioLDM's released checkpoint
    # (.safetensors, or a .ckpt read with weights_only) or a bare state dict of the VAE
    autoencoder_checkpoint: str | None = None
    audioldm_vae: AudioLDMVAEConfig = field(default_factory=AudioLDMVAEConfig)
    # hifigan: a transformers SpeechT5HifiGan folder; audioldm: a file holding AudioLDM's HiFi-GAN
    # (default: autoencoder_checkpoint, whose first_stage_model.vocoder.* it is)
    vocoder: Literal["griffinlim", "hifigan", "audioldm"] = "griffinlim"
    vocoder_path: str | None = None
    audioldm_vocoder: HiFiGANConfig = field(default_factory=HiFiGANConfig)
    griffinlim_iters: int = 32
    scale_by_std: bool = False  # training measures latent_scale = 1 / std of the first batch's latents
    latent_scale: float = 1.0  # latents are multiplied by this before diffusion (written into checkpoints)

    def __post_init__(self):
        if self.autoencoder in ("kl", "audioldm") and not self.autoencoder_checkpoint:
            raise ValueError(f"autoencoder {self.autoencoder!r} needs autoencoder_checkpoint (a file), got None")
        if self.vocoder == "hifigan" and not self.vocoder_path:
            raise ValueError("vocoder 'hifigan' needs vocoder_path (a SpeechT5HifiGan folder), got None")
        if self.vocoder == "audioldm" and not (self.vocoder_path or self.autoencoder_checkpoint):
            raise ValueError("vocoder 'audioldm' needs vocoder_path or autoencoder_checkpoint (a file), got None")
        if not (self.latent_scale > 0 and math.isfinite(self.latent_scale)):
            raise ValueError(f"latent_scale must be a positive number, got {self.latent_scale}")


def normalize_wave(wave: torch.Tensor) -> torch.Tensor:
    """AudioLDM's `normalize_wav` per clip: (wave - mean) / (max |wave - mean| + 1e-8) * 0.5. (N, S)"""
    wave = wave - wave.mean(dim=-1, keepdim=True)  # (N, S)
    return WAV_PEAK * wave / (wave.abs().amax(dim=-1, keepdim=True) + WAV_EPS)  # (N, S)


def num_frames(seconds: float, mel: MelConfig) -> int:
    """Mel frames that cover `seconds` of audio (1024 for 10.24 s at hop 160)."""
    return int(round(seconds * mel.sample_rate / mel.hop_length))


class LogMel(nn.Module):
    """wave (N, S) -> normalised log-mel (N, 1, T, F) with T = round(S / hop)."""

    def __init__(self, cfg: MelConfig):
        super().__init__()
        self.cfg = cfg
        slaney = cfg.mel_scale == "slaney"
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
            f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=1.0, center=True, pad_mode="reflect",
            norm="slaney" if slaney else None, mel_scale="slaney" if slaney else "htk",
        )

    def log_mel(self, wave: torch.Tensor) -> torch.Tensor:
        """wave (N, S) -> natural-log magnitude mel (N, 1, T, F), as AudioLDM computes it (with
        `normalize_wav`, each clip is first normalised as AudioLDM's data loader does)."""
        frames = int(round(wave.shape[-1] / self.cfg.hop_length))
        wave = normalize_wave(wave.float()) if self.cfg.normalize_wav else wave.float()  # (N, S)
        m = self.mel(wave)  # (N, F, S // hop + 1)
        m = m[..., :frames]  # (N, F, T)
        m = torch.log(m.clamp(min=self.cfg.log_floor))  # (N, F, T)
        return m.transpose(1, 2).unsqueeze(1)  # (N, 1, T, F)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(wave) - self.cfg.norm_mean) / self.cfg.norm_std  # (N, 1, T, F)

    def clamp_log_mel(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Clamp a natural-log mel to what audio in [-1, 1] can produce."""
        return log_mel.clamp(math.log(self.cfg.log_floor), math.log(self.cfg.n_fft))

    def denormalise(self, mel: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 1, T, F) -> natural-log magnitude mel (N, T, F), clamped to what audio
        in [-1, 1] can produce (a generated latent can stray far outside it)."""
        log_mel = mel.squeeze(1) * self.cfg.norm_std + self.cfg.norm_mean  # (N, T, F)
        return self.clamp_log_mel(log_mel)  # (N, T, F)


# --- autoencoders -------------------------------------------------------------------------


class IdentityAutoencoder(nn.Module):
    """The mel itself is the latent: (N, 1, T, F) both ways."""

    downsample = (1, 1)
    latent_channels = 1
    takes_log_mel = False

    def encode(self, mel: torch.Tensor, sample: bool = False) -> torch.Tensor:
        return mel

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(32, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(32, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (N, cout, H, W)
        return self.shortcut(x) + h  # (N, cout, H, W)


class KLAutoencoder(nn.Module):
    """AudioLDM-style KL autoencoder: mel (N, 1, T, F) <-> latent (N, z, T/2^k, F/2^k)."""

    def __init__(self, cfg: KLConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.channels * m for m in cfg.channel_mult]
        enc: list[nn.Module] = [nn.Conv2d(1, chans[0], 3, padding=1)]
        cin = chans[0]
        for i, c in enumerate(chans):
            enc += [_ResBlock(cin if j == 0 else c, c) for j in range(cfg.num_res_blocks)]
            cin = c
            if i < len(chans) - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        enc += [nn.GroupNorm(min(32, cin), cin), nn.SiLU(), nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(cfg.z_channels, chans[-1], 3, padding=1)]
        cin = chans[-1]
        for i, c in enumerate(reversed(chans)):
            dec += [_ResBlock(cin if j == 0 else c, c) for j in range(cfg.num_res_blocks)]
            cin = c
            if i < len(chans) - 1:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        dec += [nn.GroupNorm(min(32, cin), cin), nn.SiLU(), nn.Conv2d(cin, 1, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        k = 2 ** (len(chans) - 1)
        self.downsample = (k, k)
        self.latent_channels = cfg.z_channels
        self.takes_log_mel = False

    def encode(self, mel: torch.Tensor, sample: bool = False) -> torch.Tensor:
        moments = self.encoder(mel)  # (N, 2z, T/k, F/k)
        mean, logvar = moments.chunk(2, dim=1)  # (N, z, T/k, F/k) each
        z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn_like(mean) if sample else mean
        return z * self.cfg.scale_factor  # (N, z, T/k, F/k)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.cfg.scale_factor)  # (N, 1, T, F)


def save_kl_autoencoder(ae: KLAutoencoder, path: str | Path) -> None:
    """Write a KL autoencoder as safetensors with its `KLConfig` in the metadata."""
    meta = {KL_METADATA_KEY: json.dumps(dataclasses.asdict(ae.cfg), sort_keys=True)}
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(path), metadata=meta)


def load_kl_autoencoder(path: str | Path) -> KLAutoencoder:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KL autoencoder checkpoint {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if KL_METADATA_KEY not in meta:
            raise ValueError(f"{path}: no {KL_METADATA_KEY!r} metadata; write it with save_kl_autoencoder")
        raw = json.loads(meta[KL_METADATA_KEY])
        raw["channel_mult"] = tuple(raw["channel_mult"])
        ae = KLAutoencoder(KLConfig(**raw))
        state = {k: f.get_tensor(k) for k in f.keys()}
    ae.load_state_dict(state, strict=True)
    return ae.eval().requires_grad_(False)


# --- vocoders -----------------------------------------------------------------------------


class GriffinLimVocoder(nn.Module):
    """log-mel (N, T, F) -> wave (N, S): mel pseudo-inverse, then Griffin-Lim phase recovery."""

    def __init__(self, cfg: MelConfig, n_iter: int):
        super().__init__()
        self.cfg = cfg
        fb = torchaudio.functional.melscale_fbanks(
            cfg.n_fft // 2 + 1, cfg.f_min, cfg.f_max, cfg.n_mels, cfg.sample_rate
        )  # (n_freq, F)
        self.register_buffer("fb_pinv", torch.linalg.pinv(fb), persistent=False)  # (F, n_freq)
        self.griffinlim = torchaudio.transforms.GriffinLim(
            n_fft=cfg.n_fft, n_iter=n_iter, win_length=cfg.win_length, hop_length=cfg.hop_length, power=1.0
        )

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        mag = torch.exp(log_mel.float())  # (N, T, F)
        spec = (mag @ self.fb_pinv).clamp(min=0.0)  # (N, T, n_freq)
        return self.griffinlim(spec.transpose(1, 2))  # (N, S)


class HifiGanVocoder(nn.Module):
    """log-mel (N, T, F) -> wave (N, S) through a transformers SpeechT5HifiGan checkpoint."""

    def __init__(self, path: str, cfg: MelConfig):
        super().__init__()
        from transformers import SpeechT5HifiGan

        if not Path(path).is_dir():
            raise FileNotFoundError(f"vocoder folder {path!r} does not exist")
        self.net = SpeechT5HifiGan.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        hc = self.net.config
        if hc.model_in_dim != cfg.n_mels:
            raise ValueError(f"vocoder {path!r} takes {hc.model_in_dim} mel bins, the representation has {cfg.n_mels}")
        if hc.sampling_rate != cfg.sample_rate:
            raise ValueError(f"vocoder {path!r} runs at {hc.sampling_rate} Hz, the representation at {cfg.sample_rate} Hz")

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        wave = self.net(log_mel.float())  # (N, S) or (S,) for one item
        return wave if wave.dim() == 2 else wave.unsqueeze(0)  # (N, S)


class AudioLDMVocoder(nn.Module):
    """log-mel (N, T, F) -> wave (N, S) through AudioLDM's HiFi-GAN, from a local file."""

    def __init__(self, path: str, cfg: HiFiGANConfig, mel: MelConfig):
        super().__init__()
        if cfg.num_mels != mel.n_mels or cfg.hop_length != mel.hop_length or mel.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"AudioLDM vocoder takes {cfg.num_mels} mel bins at hop {cfg.hop_length} and {SAMPLE_RATE} Hz; "
                f"the representation has {mel.n_mels} bins, hop {mel.hop_length}, {mel.sample_rate} Hz"
            )
        if mel.mel_scale != "slaney":
            raise ValueError(f"AudioLDM vocoder needs mel_scale 'slaney' (its training features), got {mel.mel_scale!r}")
        self.net = load_vocoder(path, cfg)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        return self.net(log_mel.float().transpose(1, 2)).squeeze(1)  # (N, S)


# --- the whole representation ---------------------------------------------------------------


class Representation(nn.Module):
    """wave <-> diffusion latent, built from a `RepresentationConfig`."""

    def __init__(self, cfg: RepresentationConfig):
        super().__init__()
        self.cfg = cfg
        self.logmel = LogMel(cfg.mel)
        if cfg.autoencoder == "identity":
            self.autoencoder = IdentityAutoencoder()
        elif cfg.autoencoder == "kl":
            self.autoencoder = load_kl_autoencoder(cfg.autoencoder_checkpoint)
        else:
            if cfg.mel.mel_scale != "slaney":
                raise ValueError(f"autoencoder 'audioldm' needs mel.mel_scale 'slaney' (its training features), got {cfg.mel.mel_scale!r}")
            self.autoencoder, self.checkpoint_scale = load_autoencoder(cfg.autoencoder_checkpoint, cfg.audioldm_vae)
        self.latent_scale = cfg.latent_scale  # replaced by the measured one under scale_by_std
        self.vocoder: nn.Module | None = None  # built on first decode; training never needs it
        self.requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def latent_size(self, seconds: float) -> tuple[int, int]:
        """(T', F') of the latent for a clip of `seconds`."""
        dt, df = self.autoencoder.downsample
        frames = num_frames(seconds, self.cfg.mel)
        if frames % dt or self.cfg.mel.n_mels % df:
            raise ValueError(
                f"{seconds} s gives {frames} mel frames x {self.cfg.mel.n_mels} bins, "
                f"not divisible by the autoencoder's downsampling {self.autoencoder.downsample}"
            )
        return frames // dt, self.cfg.mel.n_mels // df

    @torch.no_grad()
    def encode(self, wave: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        """wave (N, S) -> latent (N, C, T', F') in float32. The mel is always computed in fp32;
        `autocast` runs the autoencoder under bf16 autocast (CUDA only)."""
        ae = self.autoencoder
        mel = self.logmel.log_mel(wave) if ae.takes_log_mel else self.logmel(wave)  # (N, 1, T, F)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and wave.is_cuda):
            z = ae.encode(mel)  # (N, C, T', F')
        return z.float() * self.latent_scale  # (N, C, T', F')

    @torch.no_grad()
    def decode(self, z: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Latent (N, C, T', F') -> wave (N, S), cropped or zero-padded to `num_samples`."""
        if self.vocoder is None:
            if self.cfg.vocoder == "griffinlim":
                self.vocoder = GriffinLimVocoder(self.cfg.mel, self.cfg.griffinlim_iters).to(z.device)
            elif self.cfg.vocoder == "hifigan":
                self.vocoder = HifiGanVocoder(self.cfg.vocoder_path, self.cfg.mel).to(z.device)
            else:
                path = self.cfg.vocoder_path or self.cfg.autoencoder_checkpoint
                self.vocoder = AudioLDMVocoder(path, self.cfg.audioldm_vocoder, self.cfg.mel).to(z.device)
        mel = self.autoencoder.decode(z / self.latent_scale)  # (N, 1, T, F)
        if self.autoencoder.takes_log_mel:
            log_mel = self.logmel.clamp_log_mel(mel.squeeze(1))  # (N, T, F)
        else:
            log_mel = self.logmel.denormalise(mel)  # (N, T, F)
        wave = self.vocoder(log_mel)  # (N, S')
        if num_samples is not None:
            wave = wave[:, :num_samples]  # (N, <=S)
            wave = F.pad(wave, (0, num_samples - wave.shape[1]))  # (N, S)
        return wave


def seconds_to_samples(seconds: float, sample_rate: int = SAMPLE_RATE) -> int:
    return int(math.floor(seconds * sample_rate + 0.5))
