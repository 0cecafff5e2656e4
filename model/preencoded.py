"""Pre-encoded shards: the layout `mosaiq encode` writes and the trainer reads.

stable-audio-tools pre-encodes a dataset into one `<id>.npy` latent (channels first) and one
`<id>.json` of metadata per sample, with a `details.json` at the top that records the
autoencoder config that produced them; its trainer, told `pre_encoded: true`, then skips the
autoencoder. mosaiq keeps that layout inside its WebDataset shards, beside what export wrote:

- `<key>.flac`, `<key>.json`: unchanged from the input shard (the shards stay usable for
  training from audio, and the JSON keeps its `prompt` and `quality_level`);
- `<key>.latent.npy`: the unscaled latent (C, T', F') of the clip's first `clip_seconds`
  (the normalised log-mel (1, T, F) when no autoencoder is configured); the trainer multiplies
  it by the run's latent scale, as it does with latents it computes;
- `<key>.text.npy`: the frozen text encoder's states (S, E) for the prompt, only the S tokens
  its attention mask keeps (at least one), so the mask is all ones: the loader pads a batch to
  its longest and masks the padding, which is what the encoder's own batch padding gives.

Beside the shards (the `details.json` of this layout):

- `encode_info.json` (`INFO_FILE`): format version, `complete`, the representation and text
  encoder that produced the shards (configs plus content digests of their weight files, so a
  copy elsewhere still matches), clip length, latent shape, text width, dtype;
- `encode_empty_text.npy`: the states of the empty prompt, what classifier-free training puts
  in place of a dropped prompt;
- `encode_report.json`: per shard, the samples left out and why; `sizes.json`,
  `index.parquet` and `SHA256SUMS` as export writes them (`mosaiq verify` checks the folder,
  these members included); the input's quality-stats JSON, copied.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from schemas import shard as S

FORMAT_VERSION = 1
LATENT_EXT = S.LATENT_EXT  # "latent.npy"
TEXT_EXT = S.TEXT_EXT  # "text.npy"
INFO_FILE = S.ENCODE_INFO_FILE  # "encode_info.json"
COMPLETE = S.ENCODE_COMPLETE  # its field "complete"
EMPTY_TEXT_FILE = "encode_empty_text.npy"
REPORT_FILE = "encode_report.json"
STATE_DIR = ".encode_state"  # one record per complete output shard (resume)
DTYPES = ("float32", "float16")  # how latents and text states are stored

# fields of a RepresentationConfig that do not change what `encode` computes
_DECODE_ONLY = ("vocoder", "vocoder_path", "audioldm_vocoder", "griffinlim_iters", "scale_by_std", "latent_scale")
# files of a text encoder folder that decide its states (README and the like do not)
_TEXT_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")


def _digest(path: str | Path) -> str:
    from pipeline.fs import file_digest

    return file_digest(path)


def representation_fingerprint(rep_cfg) -> dict[str, Any]:
    """What decides the latents: the representation config without its decode-side fields, and
    the autoencoder checkpoint by content digest instead of by path."""
    raw = dataclasses.asdict(rep_cfg)
    for k in _DECODE_ONLY:
        raw.pop(k)
    path = raw.pop("autoencoder_checkpoint")
    if raw["autoencoder"] != "audioldm":
        raw.pop("audioldm_vae")
    raw["autoencoder_digest"] = _digest(path) if path else None
    return json.loads(json.dumps(raw))  # as encode_info.json holds it (tuples become lists)


def text_fingerprint(text_cfg) -> dict[str, Any]:
    """What decides the text states: the folder's model type, `max_length`, and a
    digest over its config, tokenizer and weight files (by name and content)."""
    folder = Path(text_cfg.path)
    if not text_cfg.path or not folder.is_dir():
        raise FileNotFoundError(f"text encoder folder {text_cfg.path!r} does not exist (set text.path)")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _TEXT_FILE_SUFFIXES)
    from pipeline.fs import text_digest

    digest = text_digest(json.dumps([[p.name, _digest(p)] for p in files]))
    return {"model_type": config.get("model_type"), "max_length": text_cfg.max_length,
            "files_digest": digest, "folder": folder.name}


def read_info(folder: str | Path) -> dict[str, Any] | None:
    """The `encode_info.json` of a shards folder (local or in object storage), None when the
    folder holds none."""
    from pipeline.fs import location

    path = location(folder) / INFO_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: pre-encoded format version {info.get('format_version')!r}, this mosaiq reads {FORMAT_VERSION}")
    return info


def _differences(want: dict, got: dict, where: str) -> list[str]:
    return [f"{where}.{k}: shards {got.get(k)!r}, config {want.get(k)!r}"
            for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k) and k != "folder"]


def check_matches(info: dict[str, Any], folder: str, rep_cfg, text_cfg, clip_seconds: float) -> None:
    """Raise ValueError, naming every difference, unless the shards in `folder` were encoded
    completely, with this representation, this text encoder (when `text_cfg.path` is set) and
    this clip length."""
    if not info.get(COMPLETE):
        raise ValueError(f"{folder}: `mosaiq encode` has not finished writing these shards ({INFO_FILE} says complete: false); "
                         "run it again to finish")
    diffs = _differences(representation_fingerprint(rep_cfg), info["representation"], "representation")
    if text_cfg.path:
        diffs += _differences(text_fingerprint(text_cfg), info["text"], "text")
    if abs(float(info["clip_seconds"]) - clip_seconds) > 1e-9:
        diffs.append(f"clip_seconds: shards {info['clip_seconds']!r}, config data.clip_seconds {clip_seconds!r}")
    if diffs:
        raise ValueError(f"{folder} was pre-encoded with another representation or text encoder than this training "
                         f"config: {'; '.join(diffs)}. Encode the shards again with this config (`mosaiq encode "
                         f"--config ...`), or set data.pre_encoded: false to train from their audio")
