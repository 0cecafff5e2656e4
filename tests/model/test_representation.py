"""Representation: log-mel shapes, KL autoencoder and vocoder checkpoints, text encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.representation import (
    KLAutoencoder, KLConfig, MelConfig, Representation, RepresentationConfig, load_kl_autoencoder, save_kl_autoencoder,
)
from model.text import FrozenTextEncoder, TextEncoderConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tone(seconds=1.28, f0=440.0):
    t = torch.arange(int(seconds * 16000)) / 16000
    return (0.5 * torch.sin(2 * np.pi * f0 * t)).unsqueeze(0)


def test_logmel_shape_and_normalisation():
    rep = Representation(RepresentationConfig())
    mel = rep.encode(_tone())
    assert mel.shape == (1, 1, 128, 64)
    assert rep.latent_size(10.24) == (1024, 64)
    assert torch.isfinite(mel).all() and -3 < mel.mean() < 3


def test_griffinlim_round_trip_keeps_pitch():
    rep = Representation(RepresentationConfig(griffinlim_iters=16))
    wave = rep.decode(rep.encode(_tone()), num_samples=20480)[0].numpy()
    assert wave.shape == (20480,) and np.isfinite(wave).all()
    spectrum = np.abs(np.fft.rfft(wave))
    assert abs(np.argmax(spectrum) * 16000 / len(wave) - 440.0) < 45.0  # one mel band near 440 Hz is ~40 Hz wide


def test_kl_autoencoder_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    ae = KLAutoencoder(KLConfig(channels=8, channel_mult=(1, 2), z_channels=4, scale_factor=0.5))
    path = tmp_path / "kl.safetensors"
    save_kl_autoencoder(ae, path)
    rep = Representation(RepresentationConfig(autoencoder="kl", autoencoder_checkpoint=str(path)))
    z = rep.encode(_tone())
    assert z.shape == (1, 4, 64, 32) and rep.latent_channels == 4
    assert rep.latent_size(1.28) == (64, 32)
    torch.testing.assert_close(load_kl_autoencoder(path).decode(z), ae.eval().decode(z))
    assert rep.decode(z, num_samples=20480).shape == (1, 20480)


def test_kl_needs_a_checkpoint():
    with pytest.raises(ValueError, match="autoencoder_checkpoint"):
        RepresentationConfig(autoencoder="kl")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        Representation(RepresentationConfig(autoencoder="kl", autoencoder_checkpoint="nope.safetensors"))


def test_hifigan_vocoder_from_folder(tmp_path):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    hc = SpeechT5HifiGanConfig(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=16,
                               upsample_rates=[4, 4, 10], upsample_kernel_sizes=[8, 8, 20],
                               resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False)
    torch.manual_seed(0)
    SpeechT5HifiGan(hc).save_pretrained(str(tmp_path / "voc"))
    rep = Representation(RepresentationConfig(vocoder="hifigan", vocoder_path=str(tmp_path / "voc")))
    wave = rep.decode(rep.encode(_tone()), num_samples=20480)
    assert wave.shape == (1, 20480) and torch.isfinite(wave).all() and wave.abs().sum() > 0
    bad = SpeechT5HifiGanConfig(**{**hc.to_dict(), "model_in_dim": 80})
    SpeechT5HifiGan(bad).save_pretrained(str(tmp_path / "voc80"))
    with pytest.raises(ValueError, match="80 mel bins"):
        Representation(RepresentationConfig(vocoder="hifigan", vocoder_path=str(tmp_path / "voc80"))).decode(torch.zeros(1, 1, 8, 64))


def test_text_encoder_from_local_folder(text_encoder_dir):
    enc = FrozenTextEncoder(TextEncoderConfig(path=text_encoder_dir))
    h, m = enc(["high quality, a tone at 440 hertz", ""])
    assert h.shape[0] == 2 and h.shape[2] == enc.dim == 32 and m.dtype == torch.bool
    assert m[0].sum() > m[1].sum()
    assert not any(p.requires_grad for p in enc.parameters())
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        FrozenTextEncoder(TextEncoderConfig(path="missing-folder"))


def test_normalize_wav_is_audioldms():
    """AudioLDM's normalize_wav (audioldm/utils.py): minus the mean, over the peak + 1e-8, times 0.5."""
    from model.representation import normalize_wave

    rng = np.random.default_rng(0)
    waves = np.stack([0.3 + 0.1 * rng.standard_normal(16000), np.zeros(16000)]).astype(np.float32)  # DC offset; silence
    want = []
    for w in waves:
        w = w - np.mean(w)
        want.append(0.5 * w / (np.max(np.abs(w)) + 1e-8))
    got = normalize_wave(torch.from_numpy(waves)).numpy()
    np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-7)
    assert abs(np.abs(got[0]).max() - 0.5) < 1e-6 and abs(got[0].mean()) < 1e-6 and not got[1].any()
    # the mel front end applies it per clip when asked: gain and DC offset no longer change the mel
    mel = Representation(RepresentationConfig(mel=MelConfig(mel_scale="slaney", normalize_wav=True)))
    tone = _tone()
    torch.testing.assert_close(mel.encode(tone), mel.encode(0.1 * tone + 0.05), rtol=0, atol=5e-3)  # float32 STFT rounding
    plain = Representation(RepresentationConfig(mel=MelConfig(mel_scale="slaney")))
    assert (plain.encode(tone) - plain.encode(0.1 * tone + 0.05)).abs().mean() > 0.3  # up to log(10) / 2.74 = 0.84 (less where the floor clamps)
