"""QAMA's fairseq checkpoints -> a local `Wav2Vec2PMOS` folder (`mosaiq convert-qama`).

    mosaiq convert-qama --qama qama_full.pt --pretrain checkpoint_best.pt --out models/qama
    mosaiq convert-qama --qama qama_full.pt --no-layer-norm-first --out models/qama

What the files hold (QAMA's predict.py, fairseq's checkpoint_utils and trainer):
- `qama_full.pt`: the state_dict of QAMA's module: `ssl_model.*` is the whole wav2vec2 backbone
  (pretraining-only parts removed), `output_layer_arch1.*` the linear head; `fc1`, `fc2`,
  `output_layer_arch2` and `output_layer_class` are unused by the arch1 predictor. It holds
  every weight but no configuration.
- `checkpoint_best.pt`: the fairseq wav2vec2 checkpoint QAMA started from: `model` (tensors)
  and the model configuration, either as `args` (an argparse.Namespace, pre-Hydra fairseq) or
  as `cfg["model"]` (a dict, Hydra fairseq), beside optimizer and meter state (numpy scalars).
  Both are read with `model.checkpoint.safe_torch_load`; nothing else is unpickled.

The backbone's shape comes from the tensors (hidden size, layers, FFN width, conv channels and
kernels, positional conv, conv bias; the extractor's norm from its keys: layer-norm mode has
`feature_extractor.conv_layers.N.2.1.*`, the default group-norm mode only
`feature_extractor.conv_layers.0.2.*`) and is checked against the configuration when there is
one. Attention heads and conv strides come from the configuration, or from `--num-heads` /
`--conv-stride`, or else from fairseq's published sizes and its default conv stack. Pre-LN
(`layer_norm_first`, large/LV-60/XLS-R style) and post-LN models have the same keys and
compute different scores: it is read from the configuration, or must be given as
`--layer-norm-first` / `--no-layer-norm-first`; a flag that contradicts the configuration is
refused. Nothing is guessed silently: what was decided, and from where, is written to
`mosaiq_pmos.json` beside the model.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import re
from pathlib import Path

import torch

from model.checkpoint import safe_torch_load
from model.pmos import Wav2Vec2PMOS

log = logging.getLogger(__name__)

PROVENANCE_FILE = "mosaiq_pmos.json"
QAMA_SSL_PREFIX = "ssl_model."
QAMA_HEAD = "output_layer_arch1."
# fairseq's default conv stack (Wav2Vec2Config.conv_feature_layers): (channels, kernel, stride)
FAIRSEQ_DEFAULT_CONV = [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
# attention heads of every published fairseq wav2vec2 size: base, large/LV-60/XLS-R 300M, XLS-R 1B and 2B
PUBLISHED_HEADS = {768: 12, 1024: 16, 1280: 16, 1920: 16}
_WAV2VEC2_NAMES = ("wav2vec2",)

# fairseq wav2vec2 key (regex) -> transformers Wav2Vec2Model key (format string)
_FAIRSEQ_TO_HF = [
    (r"^post_extract_proj\.(weight|bias)$", "feature_projection.projection.{0}"),
    (r"^layer_norm\.(weight|bias)$", "feature_projection.layer_norm.{0}"),
    (r"^mask_emb$", "masked_spec_embed"),
    (r"^encoder\.pos_conv\.0\.bias$", "encoder.pos_conv_embed.conv.bias"),
    (r"^encoder\.pos_conv\.0\.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"^encoder\.pos_conv\.0\.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"^encoder\.layer_norm\.(weight|bias)$", "encoder.layer_norm.{0}"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|q_proj|out_proj)\.(weight|bias)$", "encoder.layers.{0}.attention.{1}.{2}"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", "encoder.layers.{0}.layer_norm.{1}"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", "encoder.layers.{0}.feed_forward.intermediate_dense.{1}"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", "encoder.layers.{0}.feed_forward.output_dense.{1}"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", "encoder.layers.{0}.final_layer_norm.{1}"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", "feature_extractor.conv_layers.{0}.conv.{1}"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$", "feature_extractor.conv_layers.{0}.layer_norm.{1}"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", "feature_extractor.conv_layers.{0}.layer_norm.{1}"),
]
# parts of a QAMA checkpoint that the arch1 predictor does not use, and pretraining-only parts
_IGNORED = re.compile(r"^(fc1|fc2|output_layer_arch2|output_layer_class|dropout)\.|^(quantizer|project_q|final_proj|target_glu)\.")


class QamaConversionError(ValueError):
    """A checkpoint that cannot be converted without guessing."""


def fairseq_to_hf_key(key: str) -> str | None:
    for pattern, target in _FAIRSEQ_TO_HF:
        m = re.match(pattern, key)
        if m:
            return target.format(*m.groups())
    return None


# --- reading ------------------------------------------------------------------------------


def read_fairseq_checkpoint(path: str | Path, what: str) -> tuple[dict, dict | None]:
    """(tensors, model configuration or None) of a fairseq checkpoint or a bare state_dict.

    The configuration is `cfg["model"]` (Hydra fairseq) or `vars(args)` (pre-Hydra fairseq).
    """
    obj = safe_torch_load(path, what=what)
    if not isinstance(obj, dict):
        raise QamaConversionError(f"{what} {str(path)!r} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("model"), dict):
        state, config = obj["model"], _model_config(obj)
    else:
        state, config = obj, None
    bad = sorted(k for k, v in state.items() if not torch.is_tensor(v))
    if bad:
        raise QamaConversionError(f"{what} {str(path)!r}: entries {bad[:5]} are not tensors")
    return state, config


def _model_config(ckpt: dict) -> dict | None:
    cfg, args = ckpt.get("cfg"), ckpt.get("args")
    if isinstance(cfg, dict) and cfg.get("model") is not None:
        model = cfg["model"]
        return dict(vars(model)) if isinstance(model, argparse.Namespace) else dict(model)
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return None


def _conv_layers_from_config(spec: str) -> list[tuple[int, int, int]]:
    """fairseq's `conv_feature_layers` string (a list expression with + and *), evaluated
    without eval: only list/tuple literals, integers, `+` and `*`."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(f"unsupported expression {ast.dump(node)[:60]}")

    try:
        layers = ev(ast.parse(spec, mode="eval"))
        return [tuple(int(x) for x in layer) for layer in layers]
    except (SyntaxError, ValueError, TypeError) as e:
        raise QamaConversionError(f"cannot read conv_feature_layers {spec!r}: {e}") from e


# --- the backbone's configuration -----------------------------------------------------------


def backbone_config(sd: dict, config: dict | None, layer_norm_first: bool | None = None, num_heads: int | None = None,
                    conv_stride: tuple[int, ...] | None = None):
    """(Wav2Vec2Config, provenance) for a fairseq wav2vec2 state dict; refuses what it cannot decide."""
    from transformers import Wav2Vec2Config

    config = config or {}
    source = "the checkpoint's configuration"
    name = config.get("_name", config.get("arch"))
    if name is not None and name not in _WAV2VEC2_NAMES:
        raise QamaConversionError(f"the backbone checkpoint is a fairseq {name!r} model; only pretrained {_WAV2VEC2_NAMES} converts")
    for key, plain in (("layer_type", "transformer"), ("pos_conv_depth", 1)):
        if config.get(key, plain) != plain:
            raise QamaConversionError(f"{key}={config[key]!r} in {source}: only {key}={plain!r} wav2vec2 models convert")

    conv_idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"feature_extractor\.conv_layers\.(\d+)\.0\.weight$", k))})
    if not conv_idx or "post_extract_proj.weight" not in sd or "encoder.layers.0.fc1.weight" not in sd:
        raise QamaConversionError("no feature_extractor.conv_layers / post_extract_proj / encoder.layers: not a wav2vec2 checkpoint")
    convs = [sd[f"feature_extractor.conv_layers.{i}.0.weight"] for i in conv_idx]  # (C_out, C_in, K)
    hidden = int(sd["post_extract_proj.weight"].shape[0])
    layers = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))})
    ffn = int(sd["encoder.layers.0.fc1.weight"].shape[0])
    pos = sd["encoder.pos_conv.0.weight_v"]  # (D, D / groups, K)
    pos_kernel, pos_groups = int(pos.shape[2]), hidden // int(pos.shape[1])
    conv_bias = "feature_extractor.conv_layers.0.0.bias" in sd
    layer_norm_mode = any(re.match(r"feature_extractor\.conv_layers\.\d+\.2\.1\.weight$", k) for k in sd)
    extractor_mode = "layer_norm" if layer_norm_mode else "default"
    from_tensors = {"encoder_embed_dim": hidden, "encoder_layers": layers, "encoder_ffn_embed_dim": ffn, "conv_pos": pos_kernel,
                    "conv_pos_groups": pos_groups, "conv_bias": conv_bias, "extractor_mode": extractor_mode}
    clash = {k: (config[k], v) for k, v in from_tensors.items() if k in config and config[k] != v}
    if clash:
        raise QamaConversionError(f"{source} contradicts the tensors (config, tensors): {clash}")
    provenance = {k: "tensors" for k in from_tensors}

    # pre-LN or post-LN: same keys, different computation; never a default
    stated = config.get("layer_norm_first")
    if stated is not None and layer_norm_first is not None and bool(stated) != layer_norm_first:
        raise QamaConversionError(
            f"{source} says layer_norm_first={bool(stated)}, but --{'' if layer_norm_first else 'no-'}layer-norm-first "
            "was given: drop the flag (the configuration is authoritative)"
        )
    if stated is None and layer_norm_first is None:
        hint = " (its feature extractor uses layer norm, as pre-LN large models do)" if layer_norm_mode else ""
        raise QamaConversionError(
            "cannot tell whether this wav2vec2 is pre-LN (layer_norm_first, large/LV-60/XLS-R style) or post-LN "
            f"(base style){hint}: the weights look the same and the scores differ. Pass --pretrain with the fairseq "
            "checkpoint that has the configuration, or say it with --layer-norm-first / --no-layer-norm-first"
        )
    pre_ln = bool(stated) if stated is not None else bool(layer_norm_first)
    provenance["layer_norm_first"] = "config" if stated is not None else "flag"

    heads, provenance["encoder_attention_heads"] = _pick(
        [("config", config.get("encoder_attention_heads")), ("flag", num_heads), ("published sizes", PUBLISHED_HEADS.get(hidden))],
        f"attention heads for hidden size {hidden} (not one of the published sizes {sorted(PUBLISHED_HEADS)}): pass --num-heads",
    )
    if hidden % heads:
        raise QamaConversionError(f"hidden size {hidden} is not divisible by {heads} attention heads")
    if num_heads is not None and config.get("encoder_attention_heads") not in (None, num_heads):
        raise QamaConversionError(f"{source} says {config['encoder_attention_heads']} attention heads, --num-heads says {num_heads}")

    shapes = [(int(c.shape[0]), int(c.shape[2])) for c in convs]
    layout = _conv_layers_from_config(config["conv_feature_layers"]) if "conv_feature_layers" in config else None
    if layout is not None and [(d, k) for d, k, _ in layout] != shapes:
        raise QamaConversionError(f"conv_feature_layers {config['conv_feature_layers']!r} does not match the tensors' (channels, kernel) {shapes}")
    default = [(d, k, s) for d, k, s in FAIRSEQ_DEFAULT_CONV] if [k for _, k, _ in FAIRSEQ_DEFAULT_CONV] == [k for _, k in shapes] else None
    strides, provenance["conv_strides"] = _pick(
        [("config", layout and tuple(s for _, _, s in layout)), ("flag", conv_stride and tuple(conv_stride)),
         ("fairseq default conv stack", default and tuple(s for _, _, s in default))],
        f"conv strides for kernels {[k for _, k in shapes]} (not fairseq's default stack): pass --conv-stride",
    )
    if len(strides) != len(shapes):
        raise QamaConversionError(f"{len(strides)} conv strides for {len(shapes)} conv layers")
    if conv_stride is not None and layout is not None and tuple(conv_stride) != strides:
        raise QamaConversionError(f"{source} gives conv strides {strides}, --conv-stride says {tuple(conv_stride)}")

    act = config.get("activation_fn", "gelu")
    provenance["activation_fn"] = "config" if "activation_fn" in config else "fairseq default"
    cfg = Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_act=act,
        conv_dim=tuple(d for d, _ in shapes),
        conv_kernel=tuple(k for _, k in shapes),
        conv_stride=strides,
        conv_bias=conv_bias,
        feat_extract_norm="layer" if layer_norm_mode else "group",
        num_conv_pos_embeddings=pos_kernel,
        num_conv_pos_embedding_groups=pos_groups,
        do_stable_layer_norm=pre_ln,
    )
    return cfg, provenance


def _pick(options: list[tuple[str, object]], refusal: str):
    """The first option that is set, with where it came from; refuse when none is."""
    for where, value in options:
        if value is not None:
            return value, where
    raise QamaConversionError("cannot decide the " + refusal)


# --- conversion ---------------------------------------------------------------------------


def convert_qama(qama: str | Path, out: str | Path, pretrain: str | Path | None = None, *,
                 layer_norm_first: bool | None = None, num_heads: int | None = None,
                 conv_stride: tuple[int, ...] | None = None) -> Path:
    """QAMA `qama_full.pt` (+ optional fairseq `checkpoint_best.pt`, for its configuration) ->
    a Wav2Vec2PMOS folder; see the module docstring for what is read from where."""
    from transformers import Wav2Vec2Model

    full, config = read_fairseq_checkpoint(qama, "QAMA checkpoint")
    ssl = {k[len(QAMA_SSL_PREFIX):]: v for k, v in full.items() if k.startswith(QAMA_SSL_PREFIX)}
    head = {k[len(QAMA_HEAD):]: v for k, v in full.items() if k.startswith(QAMA_HEAD)}
    if set(head) != {"weight", "bias"}:
        raise QamaConversionError(f"{str(qama)!r} has no {QAMA_HEAD}weight/bias: is it a QAMA checkpoint?")
    if pretrain is not None:
        pre_state, config = read_fairseq_checkpoint(pretrain, "fairseq wav2vec2 checkpoint")
        if not ssl:
            ssl = pre_state
        else:  # the configuration must describe this backbone
            differ = [k for k, v in ssl.items() if k in pre_state and pre_state[k].shape != v.shape]
            if differ:
                raise QamaConversionError(f"{str(pretrain)!r} is not this QAMA model's backbone: shapes differ at {differ[:5]}")
    if not ssl:
        raise QamaConversionError(f"{str(qama)!r} has no {QAMA_SSL_PREFIX}* weights and no --pretrain checkpoint was given")

    cfg, provenance = backbone_config(ssl, config, layer_norm_first, num_heads, conv_stride)
    hf_sd, unused = {}, []
    for k, v in ssl.items():
        target = fairseq_to_hf_key(k)
        if target is None:
            if not _IGNORED.match(k):
                unused.append(k)
            continue
        hf_sd[target] = v
    if unused:
        raise QamaConversionError(f"unrecognised fairseq key(s) {unused[:8]}: refusing a partial conversion")
    backbone = Wav2Vec2Model(cfg)
    missing, unexpected = backbone.load_state_dict(hf_sd, strict=False)
    missing = [m for m in missing if m != "masked_spec_embed"]
    if missing or unexpected:
        raise QamaConversionError(f"conversion mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model = Wav2Vec2PMOS(backbone)
    model.head.load_state_dict(head)
    out = Path(out)
    model.save_pretrained(out)
    record = {
        "source": str(qama), "pretrain": None if pretrain is None else str(pretrain), "architecture": "wav2vec2+mean+linear",
        "layer_norm_first": cfg.do_stable_layer_norm, "num_attention_heads": cfg.num_attention_heads,
        "conv_stride": list(cfg.conv_stride), "decided_from": provenance,
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("wrote %s (%d backbone tensors; pre-LN %s from %s)", out, len(hf_sd), cfg.do_stable_layer_norm, provenance["layer_norm_first"])
    return out


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mosaiq convert-qama", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qama", required=True, help="QAMA predictor state dict (qama_full.pt): every weight")
    p.add_argument("--pretrain", default=None, help="QAMA's fairseq wav2vec2 checkpoint (checkpoint_best.pt): the backbone's configuration")
    p.add_argument("--out", required=True, help="output folder (loads with --scorer wav2vec2 --model OUT)")
    p.add_argument("--layer-norm-first", action=argparse.BooleanOptionalAction, default=None,
                   help="pre-LN (large/LV-60/XLS-R style) or not; required when no configuration says it")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads, when neither the configuration nor a published size says")
    p.add_argument("--conv-stride", default=None, help="conv strides, comma-separated (e.g. 5,2,2,2,2,2,2), for a non-default conv stack")
    a = p.parse_args(argv)
    stride = tuple(int(s) for s in a.conv_stride.split(",")) if a.conv_stride else None
    print(convert_qama(a.qama, a.out, a.pretrain, layer_norm_first=a.layer_norm_first, num_heads=a.num_heads, conv_stride=stride))
    return 0
