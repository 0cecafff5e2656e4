"""AudioLDM-compatible representation: Slaney front end, VAE and HiFi-GAN under the upstream
checkpoint key names (listed here independently of model/audioldm.py), strict loading, shapes,
and the normalised log-mel of synthetic music."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from model.audioldm import AudioLDMVAEConfig, HiFiGANConfig, load_vocoder
from model.representation import LogMel, MelConfig, Representation, RepresentationConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SLANEY = MelConfig(mel_scale="slaney", norm_mean=-4.63, norm_std=2.74)
TINY_VAE = AudioLDMVAEConfig(ch=8, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8, num_groups=4)
TINY_VOC = HiFiGANConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3, 5),))


def upstream_vae_shapes(ch, mult, nres, z, e) -> dict[str, tuple]:
    """Parameter names and shapes of AudioLDM's AutoencoderKL (ddconfig: ch, ch_mult, num_res_blocks,
    z_channels, attn_resolutions []; embed_dim), as its Encoder / Decoder / ResnetBlock name them."""
    out = {}

    def conv(n, cin, cout, k):
        out[n + ".weight"], out[n + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(n, c):
        out[n + ".weight"], out[n + ".bias"] = (c,), (c,)

    def res(n, cin, cout):
        norm(n + ".norm1", cin), conv(n + ".conv1", cin, cout, 3), norm(n + ".norm2", cout), conv(n + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(n + ".nin_shortcut", cin, cout, 1)

    def mid(n, c):
        res(n + ".block_1", c, c), res(n + ".block_2", c, c), norm(n + ".attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{n}.attn_1.{p}", c, c, 1)

    in_mult = (1,) + tuple(mult)
    conv("encoder.conv_in", 1, ch, 3)
    for i in range(len(mult)):
        bi, bo = ch * in_mult[i], ch * mult[i]
        for j in range(nres):
            res(f"encoder.down.{i}.block.{j}", bi, bo)
            bi = bo
        if i != len(mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", bo, bo, 3)
    mid("encoder.mid", bi)
    norm("encoder.norm_out", bi), conv("encoder.conv_out", bi, 2 * z, 3)
    bi = ch * mult[-1]
    conv("decoder.conv_in", z, bi, 3)
    mid("decoder.mid", bi)
    for i in reversed(range(len(mult))):
        bo = ch * mult[i]
        for j in range(nres + 1):
            res(f"decoder.up.{i}.block.{j}", bi, bo)
            bi = bo
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", bi, bi, 3)
    norm("decoder.norm_out", bi), conv("decoder.conv_out", bi, 1, 3)
    conv("quant_conv", 2 * z, 2 * e, 1), conv("post_quant_conv", e, z, 1)
    return out


def upstream_hifigan_shapes(mels, rates, kernels, c0, rk, rd) -> dict[str, tuple]:
    """Parameter names and shapes of AudioLDM's hifigan.Generator after remove_weight_norm."""
    out = {"conv_pre.weight": (c0, mels, 7), "conv_pre.bias": (c0,)}
    for i, (u, k) in enumerate(zip(rates, kernels)):
        out[f"ups.{i}.weight"], out[f"ups.{i}.bias"] = (c0 // 2**i, c0 // 2 ** (i + 1), k), (c0 // 2 ** (i + 1),)
        c = c0 // 2 ** (i + 1)
        for j, (kk, dd) in enumerate(zip(rk, rd)):
            for conv in ("convs1", "convs2"):
                for m in range(len(dd)):
                    n = f"resblocks.{i * len(rk) + j}.{conv}.{m}"
                    out[n + ".weight"], out[n + ".bias"] = (c, c, kk), (c,)
    out["conv_post.weight"], out["conv_post.bias"] = (1, c0 // 2 ** len(rates), 7), (1,)
    return out


def _random(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * (0.05 if len(s) > 1 else 0.01) + (1.0 if k.endswith("norm1.weight") or k.endswith("norm2.weight") else 0.0)
            for k, s in shapes.items()}


def _release_like(tmp_path, fmt):
    """A file laid out as AudioLDM's released checkpoint: first_stage_model.* (vocoder inside),
    the diffusion model's tensors beside it, and scale_factor."""
    vae = _random(upstream_vae_shapes(8, (1, 2, 4), 1, 8, 8), 0)
    voc = _random(upstream_hifigan_shapes(64, (5, 4, 2, 2, 2), (16, 16, 8, 4, 4), 32, (3,), ((1, 3, 5),)), 1)
    state = {f"first_stage_model.{k}": v for k, v in vae.items()}
    state.update({f"first_stage_model.vocoder.{k}": v for k, v in voc.items()})
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 8, 3, 3)
    state["scale_factor"] = torch.tensor(0.75)
    if fmt == "ckpt":
        path = tmp_path / "audioldm-tiny.ckpt"
        torch.save({"state_dict": state, "global_step": 5}, path)
    else:
        path = tmp_path / "audioldm-tiny.safetensors"
        save_file(state, str(path))
    return path, vae, voc


def _music(seconds=1.28, seed=0, sr=16000):
    """A chord progression with harmonics and decays, a kick and hi-hat pattern, peak 0.5
    (AudioLDM's loudness normalisation)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = np.zeros_like(t)
    beat = 0.32
    for b in range(int(seconds / beat)):
        root = rng.choice([110.0, 130.8, 146.8, 164.8])
        seg = (t >= b * beat) & (t < (b + 1) * beat)
        tt = t[seg] - b * beat
        for ratio in (1.0, 1.26, 1.5):
            for h in range(1, 6):
                wave[seg] += np.sin(2 * np.pi * root * ratio * h * tt) * np.exp(-3 * tt) / h
        wave[seg] += 2 * np.sin(2 * np.pi * 55 * tt) * np.exp(-25 * tt)  # kick
        hat = (t >= b * beat + beat / 2) & (t < b * beat + beat / 2 + 0.05)
        wave[hat] += 0.5 * rng.standard_normal(hat.sum()) * np.exp(-60 * (t[hat] - t[hat][0]))
    wave += 0.003 * rng.standard_normal(len(t))
    return torch.from_numpy(0.5 * wave / np.abs(wave).max()).float()


def test_slaney_front_end_matches_librosa_filters_and_audioldm_settings():
    librosa = pytest.importorskip("librosa")
    mel = LogMel(SLANEY)
    fb = mel.mel.mel_scale.fb  # (n_freq, n_mels)
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0)  # AudioLDM's mel_basis
    np.testing.assert_allclose(fb.T.numpy(), ref, rtol=1e-4, atol=1e-7)
    s = mel.mel.spectrogram
    assert (s.n_fft, s.hop_length, s.win_length, s.power, s.center, s.pad_mode) == (1024, 160, 1024, 1.0, True, "reflect")
    # STFT magnitude, Slaney mel, log of the magnitude clamped at 1e-5 (TacotronSTFT)
    wave = _music().unsqueeze(0)
    spec = torch.stft(wave, 1024, 160, 1024, torch.hann_window(1024), center=True, pad_mode="reflect", return_complex=True).abs()
    want = torch.log(torch.clamp(torch.from_numpy(ref) @ spec, min=1e-5))[..., :128]  # (1, 64, 128)
    torch.testing.assert_close(mel.log_mel(wave)[0, 0].T, want[0], atol=1e-4, rtol=1e-4)


def test_normalised_slaney_log_mel_of_music_is_near_standard():
    mel = LogMel(SLANEY)
    m = torch.cat([mel(_music(seconds=5.12, seed=s).unsqueeze(0)) for s in range(4)])
    # stated bounds: |mean| < 0.5 and std in [0.7, 1.4] (measured below in the report)
    assert abs(m.mean().item()) < 0.5 and 0.7 < m.std().item() < 1.4, (m.mean().item(), m.std().item())


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_release_layout_loads_strictly_and_round_trips(tmp_path, fmt):
    path, vae, voc = _release_like(tmp_path, fmt)
    cfg = RepresentationConfig(mel=SLANEY, autoencoder="audioldm", autoencoder_checkpoint=str(path), audioldm_vae=TINY_VAE,
                               vocoder="audioldm", audioldm_vocoder=TINY_VOC, latent_scale=0.5)
    rep = Representation(cfg)
    loaded = rep.autoencoder.state_dict()
    assert set(loaded) == set(vae) and all(torch.equal(loaded[k], vae[k]) for k in vae)
    assert rep.checkpoint_scale == 0.75 and rep.latent_channels == 8 and rep.latent_size(10.24) == (256, 16)
    wave = torch.stack([_music(seed=0), _music(seed=1)])  # (2, 20480): 128 frames
    z = rep.encode(wave)
    assert z.shape == (2, 8, 32, 16)  # (N, 8, T/4, F/4): 1024 x 64 -> 256 x 16 at 10.24 s
    torch.testing.assert_close(z, rep.autoencoder.encode(rep.logmel.log_mel(wave)) * 0.5)
    mel = rep.autoencoder.decode(z / 0.5)
    assert mel.shape == (2, 1, 128, 64)
    out = rep.decode(z, num_samples=20480)
    assert out.shape == (2, 20480) and torch.isfinite(out).all() and out.abs().max() <= 1.0
    assert set(rep.vocoder.net.state_dict()) == set(voc)
    # hop 160; upstream's transposed convolutions (kernel 16, stride 5, padding 5) overshoot a little,
    # and decode crops to the requested length
    assert 1600 <= rep.vocoder.net(torch.zeros(1, 64, 10)).shape[-1] < 1700


def test_wrong_shapes_and_unsafe_files_are_refused(tmp_path):
    path, _, _ = _release_like(tmp_path, "safetensors")
    big = RepresentationConfig(mel=SLANEY, autoencoder="audioldm", autoencoder_checkpoint=str(path),
                               audioldm_vae=AudioLDMVAEConfig(ch=16, num_res_blocks=1, num_groups=4))
    with pytest.raises(ValueError, match="wrong shape"):
        Representation(big)
    with pytest.raises(ValueError, match="missing"):
        load_vocoder(path, HiFiGANConfig(upsample_initial_channel=32))  # 3 resblock kernels, the file has 1
    with pytest.raises(ValueError, match="slaney"):
        Representation(RepresentationConfig(autoencoder="audioldm", autoencoder_checkpoint=str(path), audioldm_vae=TINY_VAE))
    pickled = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hparams": object()}, pickled)
    with pytest.raises(ValueError, match="weights_only"):
        load_vocoder(pickled, TINY_VOC)


def test_weight_normed_hifigan_generator_file_folds_to_plain_weights(tmp_path):
    shapes = upstream_hifigan_shapes(64, (5, 4, 2, 2, 2), (16, 16, 8, 4, 4), 32, (3,), ((1, 3, 5),))
    plain = _random(shapes, 2)
    normed = {}
    for k, v in plain.items():
        if k.endswith(".weight"):
            base = k[: -len(".weight")]
            normed[base + ".weight_v"] = v * 3.0
            normed[base + ".weight_g"] = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
        else:
            normed[k] = v
    torch.save({"generator": normed}, tmp_path / "g_00100000")
    voc = load_vocoder(tmp_path / "g_00100000", TINY_VOC)
    for k, v in voc.state_dict().items():
        torch.testing.assert_close(v, plain[k])
