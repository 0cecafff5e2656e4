"""`convert_qama` on checkpoints written the way fairseq and QAMA write them: a pre-Hydra
fairseq dict (an `args` Namespace, numpy scalars pickled by numpy 1) and a Hydra one (a `cfg`
dict), post-LN and pre-LN wav2vec2, and QAMA's `qama_full.pt` (its module's state_dict). The
converted model must compute what torchaudio's fairseq importer (its model and its fairseq key
map) computes on the same weights, through QAMA's formula: the time-mean of the last hidden
state, the linear head, clamped to [1, 5]."""

from __future__ import annotations

import argparse
import functools
import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


from model import pmos, qama  # noqa: E402
from model.checkpoint import UnsafeCheckpointError  # noqa: E402

TINY_CONV = "[(16, 10, 5)] + [(16, 3, 2)] * 2"


def fairseq_config(layer_norm_first: bool, extractor_mode: str = "default", conv_bias: bool = False,
                   hidden: int = 32, heads: int = 2, conv: str = TINY_CONV) -> dict:
    """The model part of a fairseq wav2vec2 configuration (fairseq's Wav2Vec2Config fields)."""
    return {
        "_name": "wav2vec2", "extractor_mode": extractor_mode, "encoder_layers": 2, "encoder_embed_dim": hidden,
        "encoder_ffn_embed_dim": 48, "encoder_attention_heads": heads, "activation_fn": "gelu", "layer_type": "transformer",
        "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "encoder_layerdrop": 0.05,
        "dropout_input": 0.1, "dropout_features": 0.1, "final_dim": 16, "layer_norm_first": layer_norm_first,
        "conv_feature_layers": conv, "conv_bias": conv_bias, "logit_temp": 0.1, "quantize_targets": True,
        "feature_grad_mult": 0.1, "latent_vars": 8, "latent_groups": 2, "latent_dim": 0, "mask_length": 10,
        "mask_prob": 0.65, "conv_pos": 16, "conv_pos_groups": 2, "pos_conv_depth": 1,
    }


def fairseq_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the names and shapes fairseq's Wav2Vec2Model gives them."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        scale = scale if scale is not None else (1.0 / np.sqrt(shape[-1]) if len(shape) > 1 else 0.1)
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, n):
        return {f"{prefix}.weight": 1 + rnd(n), f"{prefix}.bias": rnd(n)}

    conv = qama._conv_layers_from_config(cfg["conv_feature_layers"])
    d, f, k, groups = cfg["encoder_embed_dim"], cfg["encoder_ffn_embed_dim"], cfg["conv_pos"], cfg["conv_pos_groups"]
    sd, c_in = {}, 1
    for i, (c, kernel, _) in enumerate(conv):
        sd[f"feature_extractor.conv_layers.{i}.0.weight"] = rnd(c, c_in, kernel, scale=1.0 / np.sqrt(c_in * kernel))
        if cfg["conv_bias"]:
            sd[f"feature_extractor.conv_layers.{i}.0.bias"] = rnd(c)
        if cfg["extractor_mode"] == "layer_norm":  # Sequential(TransposeLast, Fp32LayerNorm, TransposeLast)
            sd.update(norm(f"feature_extractor.conv_layers.{i}.2.1", c))
        elif i == 0:  # Fp32GroupNorm on the first layer only
            sd.update(norm(f"feature_extractor.conv_layers.{i}.2", c))
        c_in = c
    sd.update(norm("layer_norm", c_in))
    sd["post_extract_proj.weight"], sd["post_extract_proj.bias"] = rnd(d, c_in), rnd(d)
    sd["mask_emb"] = rnd(d)
    sd["encoder.pos_conv.0.weight_v"] = rnd(d, d // groups, k)
    sd["encoder.pos_conv.0.weight_g"] = 1 + rnd(1, 1, k)  # weight_norm(dim=2)
    sd["encoder.pos_conv.0.bias"] = rnd(d)
    for layer in range(cfg["encoder_layers"]):
        p = f"encoder.layers.{layer}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            sd[f"{p}.self_attn.{proj}.weight"], sd[f"{p}.self_attn.{proj}.bias"] = rnd(d, d), rnd(d)
        sd.update(norm(f"{p}.self_attn_layer_norm", d))
        sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"] = rnd(f, d), rnd(f)
        sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"] = rnd(d, f), rnd(d)
        sd.update(norm(f"{p}.final_layer_norm", d))
    sd.update(norm("encoder.layer_norm", d))
    # pretraining-only modules (QAMA removes them with remove_pretraining_modules())
    sd["quantizer.vars"] = rnd(1, 16, 8)
    sd["quantizer.weight_proj.weight"], sd["quantizer.weight_proj.bias"] = rnd(16, c_in), rnd(16)
    sd["project_q.weight"], sd["project_q.bias"] = rnd(16, 16), rnd(16)
    sd["final_proj.weight"], sd["final_proj.bias"] = rnd(16, d), rnd(16)
    return sd


def _training_state():
    return {
        "optimizer_history": [{"criterion_name": "Wav2vecCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {"best": np.float64(2.31)}, "num_updates": 400000}],
        "extra_state": {
            "metrics": collections.OrderedDict(default=[("loss", 0, "AverageMeter", {"val": np.float64(2.3), "sum": np.float64(23.0), "count": 10, "round": 3})]),
            "train_iterator": {"epoch": 57, "iterations_in_epoch": 0, "shuffle": True},
            "previous_training_time": 123456.5,
        },
        "last_optimizer_state": {"state": {0: {"step": 400000, "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": np.float64(5e-4), "params": [0]}]},
    }


def save_pre_hydra(path: Path, cfg: dict, state: dict, save_with_numpy1_names) -> Path:
    """fairseq before Hydra (<= 0.10): the configuration is an argparse.Namespace in `args`."""
    args = argparse.Namespace(arch=cfg["_name"], task="audio_pretraining", criterion="wav2vec", lr=[np.float64(5e-4)],
                              max_update=400000, **{k: v for k, v in cfg.items() if k != "_name"})
    save_with_numpy1_names({"args": args, "model": state, **_training_state()}, path)
    return path


def save_hydra(path: Path, cfg: dict, state: dict) -> Path:
    """fairseq with Hydra (trainer.state_dict()): `args` None, `cfg` a plain dict (OmegaConf.to_container)."""
    full_cfg = {"_name": None, "common": {"fp16": True, "log_interval": 200, "seed": 1}, "model": cfg,
                "task": {"_name": "audio_pretraining", "sample_rate": 16000, "normalize": False},
                "optimization": {"max_update": 400000, "lr": [0.0005]}}
    torch.save({"args": None, "cfg": full_cfg, "model": state, "criterion": None, "task_state": {}, **_training_state()}, path)
    return path


def save_qama_full(path: Path, backbone: dict, seed: int) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """QAMA's `model.state_dict()`: the backbone (pretraining modules removed) and all its heads."""
    g = torch.Generator().manual_seed(seed)
    d = backbone["post_extract_proj.weight"].shape[0]
    keep = {k: v for k, v in backbone.items() if not k.startswith(("quantizer.", "project_q.", "final_proj."))}
    w, b = torch.randn(1, d, generator=g) / np.sqrt(d), torch.tensor([3.0])
    sd = collections.OrderedDict((f"ssl_model.{k}", v) for k, v in keep.items())
    sd.update({"fc1.weight": torch.zeros(256, 768), "fc1.bias": torch.zeros(256), "fc2.weight": torch.zeros(128, 256),
               "fc2.bias": torch.zeros(128), "output_layer_arch1.weight": w, "output_layer_arch1.bias": b,
               "output_layer_arch2.weight": torch.zeros(1, 128), "output_layer_arch2.bias": torch.zeros(1),
               "output_layer_class.weight": torch.zeros(5, d), "output_layer_class.bias": torch.zeros(5)})
    torch.save(sd, path)
    return path, w, b


def finetuned(state: dict, seed: int) -> dict:
    """QAMA fine-tunes the backbone: its weights differ from the pretraining checkpoint's."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def torchaudio_reference(cfg: dict, state: dict, w: torch.Tensor, b: torch.Tensor, wav: torch.Tensor) -> torch.Tensor:
    """QAMA's score by torchaudio's fairseq importer: its model built from the fairseq
    configuration and loaded (strictly) through its own fairseq key map."""
    from torchaudio.models import wav2vec2_model
    from torchaudio.models.wav2vec2.utils.import_fairseq import _convert_state_dict

    model = wav2vec2_model(
        extractor_mode="layer_norm" if cfg["extractor_mode"] == "layer_norm" else "group_norm",
        extractor_conv_layer_config=qama._conv_layers_from_config(cfg["conv_feature_layers"]),
        extractor_conv_bias=cfg["conv_bias"], encoder_embed_dim=cfg["encoder_embed_dim"], encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=cfg["conv_pos"], encoder_pos_conv_groups=cfg["conv_pos_groups"],
        encoder_num_layers=cfg["encoder_layers"], encoder_num_heads=cfg["encoder_attention_heads"],
        encoder_attention_dropout=0.0, encoder_ff_interm_features=cfg["encoder_ffn_embed_dim"],
        encoder_ff_interm_dropout=0.0, encoder_dropout=0.0, encoder_layer_norm_first=cfg["layer_norm_first"],
        encoder_layer_drop=0.0, aux_num_out=None,
    ).eval()
    model.load_state_dict(_convert_state_dict(state))
    with torch.no_grad():
        h, _ = model(wav)  # (B, F, D)
        return (h.mean(dim=1) @ w.T + b).squeeze(-1).clamp(1.0, 5.0)  # (B,)


def waves(n: int = 2, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy((0.1 * rng.standard_normal((n, int(seconds * 16000)))).astype(np.float32))


def score(folder: Path, wav: torch.Tensor) -> torch.Tensor:
    model = pmos.Wav2Vec2PMOS.from_pretrained(folder)
    with torch.no_grad():
        return model(wav)


CASES = {  # name: (fairseq configuration, writer)
    "pre-hydra-args-post-LN": (fairseq_config(False), save_pre_hydra),
    "hydra-cfg-pre-LN-layer-norm-extractor": (fairseq_config(True, "layer_norm", conv_bias=True), save_hydra),
    "hydra-cfg-post-LN": (fairseq_config(False), save_hydra),
    "pre-hydra-args-pre-LN": (fairseq_config(True, "layer_norm", conv_bias=True), save_pre_hydra),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_computes_what_torchaudio_computes(tmp_path, case, save_with_numpy1_names):
    cfg, save = CASES[case]
    if save is save_pre_hydra:  # a fairseq 0.10-era file: numpy scalars under numpy 1's names
        save = functools.partial(save_pre_hydra, save_with_numpy1_names=save_with_numpy1_names)
    pretrained = fairseq_state(cfg, seed=1)
    pretrain = save(tmp_path / "checkpoint_best.pt", cfg, pretrained)
    full, w, b = save_qama_full(tmp_path / "qama_full.pt", finetuned(pretrained, seed=2), seed=3)
    out = qama.convert_qama(full, tmp_path / "converted", pretrain)  # no flags: the configuration says it all
    x = waves()
    ref = torchaudio_reference(cfg, {k[len("ssl_model."):]: v for k, v in torch.load(full).items() if k.startswith("ssl_model.")}, w, b, x)
    assert 1.0 < ref.min() and ref.max() < 5.0  # not clamped: the comparison means something
    torch.testing.assert_close(score(out, x), ref, atol=2e-5, rtol=1e-5)
    record = json.loads((out / qama.PROVENANCE_FILE).read_text())
    assert record["layer_norm_first"] is cfg["layer_norm_first"]
    assert record["decided_from"]["layer_norm_first"] == "config" and record["decided_from"]["encoder_attention_heads"] == "config"


def test_qama_full_alone_needs_an_explicit_layer_norm_flag(tmp_path):
    """qama_full.pt holds every weight but no configuration: pre-LN cannot be read from it."""
    cfg = fairseq_config(True, "layer_norm", conv_bias=True, hidden=768, heads=12,
                         conv="[(16, 10, 5)] + [(16, 3, 2)] * 4 + [(16, 2, 2)] * 2")  # fairseq's default stack
    backbone = fairseq_state(cfg, seed=4)
    full, w, b = save_qama_full(tmp_path / "qama_full.pt", backbone, seed=5)
    with pytest.raises(qama.QamaConversionError, match="--layer-norm-first / --no-layer-norm-first") as err:
        qama.convert_qama(full, tmp_path / "none")
    assert "feature extractor uses layer norm" in str(err.value)
    assert not (tmp_path / "none").exists()

    x = waves(seed=1)
    ref = torchaudio_reference(cfg, backbone, w, b, x)
    right = qama.convert_qama(full, tmp_path / "right", layer_norm_first=True)
    torch.testing.assert_close(score(right, x), ref, atol=2e-5, rtol=1e-5)
    decided = json.loads((right / qama.PROVENANCE_FILE).read_text())["decided_from"]
    assert decided["layer_norm_first"] == "flag" and decided["encoder_attention_heads"] == "published sizes"
    assert decided["conv_strides"] == "fairseq default conv stack"
    # why the flag is required: the other choice loads without error and scores differently
    wrong = qama.convert_qama(full, tmp_path / "wrong", layer_norm_first=False)
    assert (score(wrong, x) - ref).abs().max() > 1e-2


def test_a_flag_that_contradicts_the_configuration_is_refused(tmp_path):
    for cfg, flag in [(fairseq_config(True, "layer_norm"), False), (fairseq_config(False), True)]:
        backbone = fairseq_state(cfg, seed=6)
        pretrain = save_hydra(tmp_path / "ckpt.pt", cfg, backbone)
        full, _, _ = save_qama_full(tmp_path / "qama_full.pt", backbone, seed=7)
        with pytest.raises(qama.QamaConversionError, match=f"layer_norm_first={not flag}.*layer-norm-first"):
            qama.convert_qama(full, tmp_path / "o", pretrain, layer_norm_first=flag)
        with pytest.raises(qama.QamaConversionError, match="attention heads, --num-heads says 4"):
            qama.convert_qama(full, tmp_path / "o", pretrain, num_heads=4)


def test_what_cannot_be_decided_or_does_not_fit_is_refused(tmp_path):
    cfg = fairseq_config(False)
    backbone = fairseq_state(cfg, seed=8)
    full, _, _ = save_qama_full(tmp_path / "qama_full.pt", backbone, seed=9)
    # hidden size 32 is no published size, the conv stack is not fairseq's default
    with pytest.raises(qama.QamaConversionError, match="attention heads for hidden size 32"):
        qama.convert_qama(full, tmp_path / "o", layer_norm_first=False)
    with pytest.raises(qama.QamaConversionError, match=r"conv strides for kernels \[10, 3, 3\]"):
        qama.convert_qama(full, tmp_path / "o", layer_norm_first=False, num_heads=2)
    assert qama.convert_qama(full, tmp_path / "o", layer_norm_first=False, num_heads=2, conv_stride=(5, 2, 2)).is_dir()

    wrong = dict(cfg, conv_pos=32)
    with pytest.raises(qama.QamaConversionError, match="contradicts the tensors.*conv_pos"):
        qama.convert_qama(full, tmp_path / "o", save_hydra(tmp_path / "c.pt", wrong, backbone))
    with pytest.raises(qama.QamaConversionError, match="'wav2vec_ctc' model"):
        qama.convert_qama(full, tmp_path / "o", save_hydra(tmp_path / "c.pt", dict(cfg, _name="wav2vec_ctc"), backbone))
    other = fairseq_state(fairseq_config(False, hidden=64, heads=4), seed=1)
    with pytest.raises(qama.QamaConversionError, match="not this QAMA model's backbone"):
        qama.convert_qama(full, tmp_path / "o", save_hydra(tmp_path / "c.pt", cfg, other))

    extra = torch.load(full)
    extra["ssl_model.encoder.mystery.weight"] = torch.zeros(2)
    torch.save(extra, tmp_path / "q.pt")
    with pytest.raises(qama.QamaConversionError, match="unrecognised fairseq key"):
        qama.convert_qama(tmp_path / "q.pt", tmp_path / "o", layer_norm_first=False, num_heads=2, conv_stride=(5, 2, 2))
    with pytest.raises(qama.QamaConversionError, match="no output_layer_arch1"):
        qama.convert_qama(save_hydra(tmp_path / "c.pt", cfg, backbone), tmp_path / "o")


class TrainerState:
    """Any object outside the allowlist: loading it would mean unpickling code."""


def test_pickled_objects_are_refused_by_name(tmp_path):
    cfg = fairseq_config(False)
    torch.save({"args": argparse.Namespace(arch="wav2vec2"), "model": fairseq_state(cfg, 0), "trainer": TrainerState()}, tmp_path / "evil.pt")
    full, _, _ = save_qama_full(tmp_path / "qama_full.pt", fairseq_state(cfg, 0), seed=0)
    with pytest.raises(UnsafeCheckpointError, match="TrainerState.*weights_only=True"):
        qama.convert_qama(full, tmp_path / "o", tmp_path / "evil.pt")


def test_cli_converts_with_qama_full_alone(tmp_path, capsys):
    from pipeline.cli import main

    backbone = fairseq_state(fairseq_config(False), seed=2)
    full, _, _ = save_qama_full(tmp_path / "qama_full.pt", backbone, seed=2)
    base = ["convert-qama", "--qama", str(full), "--num-heads", "2", "--conv-stride", "5,2,2"]
    assert main(base + ["--out", str(tmp_path / "o")]) == 2  # no pre-LN answer: refused, no traceback
    assert "layer-norm-first" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "o"), "--no-layer-norm-first"]) == 0
    assert pmos.build_scorer("wav2vec2", tmp_path / "o")(list(waves().numpy())).shape == (2,)
