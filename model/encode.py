"""`mosaiq encode`: shards -> the same shards plus each sample's latent and text states.

    mosaiq encode --input SHARDS --output ENCODED --config jobs/train-qamdt-official.yaml \\
        --text-encoder FLAN-T5-LARGE-DIR [--gpu]

The layout is model/preencoded.py's (stable-audio-tools' pre-encoded data inside mosaiq's
WebDataset shards); `mosaiq train --shards ENCODED` with the same config then runs neither the
autoencoder nor the text encoder per step. How a run goes:

1. The driver claims the output folder (`pipeline.fs.stage_output`), fingerprints the
   representation and text encoder of the config (configs plus weight-file digests), encodes
   the empty prompt, and writes `encode_info.json` with `complete: false`.
2. One Ray task per input shard (`pipeline.backend.run_tasks`; with `--gpu`, one GPU each)
   loads the encoders once per worker process, reads the shard with the trainer's own checks
   (model/data.py), decodes each clip to `clip_seconds` at 16 kHz mono (from its start), encodes
   batches, and writes the output shard under a temporary name, renamed when complete. A
   record in `.encode_state/` (input digest, encoder digest, output sha256, sample keys) marks
   it done; a re-run skips shards whose record matches, so a killed run resumes.
3. A sample that cannot be used (bad members, audio or JSON, non-finite latent) is left out
   with its reason; the run goes on. The driver writes `encode_report.json`, the folder's
   `sizes.json`, `index.parquet` and `SHA256SUMS` as export does (`pipeline.shards`), copies
   the quality-stats JSON and marks `encode_info.json` complete; `mosaiq verify` checks the
   folder then as it checks export's, plus every latent and text-state member.

Input and output may be local folders or in object storage (`s3://bucket/shards`, `gs://...`),
each independently: shards are streamed from there and uploaded once complete (`pipeline.fs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from jobs.config import from_dict, load, to_dict
from model import preencoded as P
from model.data import DataConfig, SampleError, check_sample, decode_audio, list_shards, read_shard
from model.representation import CLIP_SECONDS, Representation, RepresentationConfig, seconds_to_samples
from model.text import FrozenTextEncoder, TextEncoderConfig
from pipeline import fs
from pipeline.shards import HashingWriter, tar_writer, write_folder_index
from schemas import shard as S

log = logging.getLogger(__name__)

STAGE = "encode"
STATS_GLOB = "*stats*.json"  # the quality-stats JSON export writes beside the shards


@dataclass(frozen=True)
class EncodeConfig:
    """What to encode with (the training config's representation and text encoder) and how."""

    representation: RepresentationConfig = field(default_factory=RepresentationConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    clip_seconds: float = CLIP_SECONDS  # latents cover each clip's first clip_seconds (padded when shorter)
    batch_size: int = 16  # clips per encoder call
    dtype: Literal["float32", "float16"] = "float32"  # how latents and text states are stored
    max_member_bytes: int = DataConfig.max_member_bytes
    max_audio_seconds: float | None = None  # None: as the trainer's loader (DataConfig.audio_limit_s)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_cpus: float = 1.0  # per task
    num_gpus: float = 0.0  # per task (--gpu: 1)

    def __post_init__(self):
        if self.batch_size < 1 or self.clip_seconds <= 0:
            raise ValueError(f"batch_size {self.batch_size} must be >= 1 and clip_seconds {self.clip_seconds} > 0")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus/num_gpus must be >= 0, got {self.num_cpus}/{self.num_gpus}")

    @property
    def data(self) -> DataConfig:
        """The loader settings whose checks and audio limits encode applies."""
        return DataConfig(clip_seconds=self.clip_seconds, max_member_bytes=self.max_member_bytes,
                          max_audio_seconds=self.max_audio_seconds)


def fingerprint(cfg: EncodeConfig) -> dict[str, Any]:
    """What decides the encoded bytes: representation, text encoder, clip length, dtype."""
    return {"representation": P.representation_fingerprint(cfg.representation), "text": P.text_fingerprint(cfg.text),
            "clip_seconds": cfg.clip_seconds, "dtype": cfg.dtype, "format_version": P.FORMAT_VERSION}


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# --- one shard (a Ray task) ----------------------------------------------------------------

_LOADED: dict[str, tuple[Representation, FrozenTextEncoder, torch.device]] = {}  # per worker process


def load_encoders(cfg: EncodeConfig) -> tuple[Representation, FrozenTextEncoder, torch.device]:
    """The representation (latent scale 1: latents are stored unscaled) and text encoder, loaded
    once per process and kept for the next shard."""
    key = json.dumps(to_dict(cfg), sort_keys=True)
    if key not in _LOADED:
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if want_cuda else "cpu")
        rep = Representation(dataclasses.replace(cfg.representation, latent_scale=1.0)).to(device)
        _LOADED.clear()
        _LOADED[key] = (rep, FrozenTextEncoder(cfg.text).to(device), device)
    return _LOADED[key]


@torch.no_grad()
def prompt_states(text: FrozenTextEncoder, prompts: list[str]) -> list[np.ndarray]:
    """Each prompt's text states (S_i, E): the tokens its mask keeps (at least the first, which
    the model always attends to)."""
    hidden, mask = text(prompts)  # (N, S, E), (N, S)
    return [(h[m] if bool(m.any()) else h[:1]).float().cpu().numpy() for h, m in zip(hidden, mask)]  # [(S_i, E)]


@torch.no_grad()
def encode_batch(rep: Representation, text: FrozenTextEncoder, device: torch.device, waves: list[np.ndarray],
                 prompts: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Clips [(S,)] and prompts -> unscaled latents (N, C, T', F') and each prompt's states."""
    z = rep.encode(torch.from_numpy(np.stack(waves)).to(device))  # (N, C, T', F')
    return z.float().cpu().numpy(), prompt_states(text, prompts)


def _state_path(out: Path, name: str) -> Path:
    return out / P.STATE_DIR / f"{name}.json"


def _name(url: str) -> str:
    return fs.location(url).name


def completed(url: str, out: Path, encoder_digest: str) -> dict | None:
    """The record of an earlier complete encoding of this input shard with these encoders, or None."""
    name = _name(url)
    state_file, shard = _state_path(out, name), out / name
    if not (state_file.is_file() and shard.is_file()):
        return None
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if state.get("encoder_digest") != encoder_digest or state.get("input_digest") != fs.file_digest(url):
        return None
    if state.get("bytes") != fs.size_and_mtime(shard)[0] or state.get("sha256") != fs.sha256_file(shard):
        return None  # (a record of an older mosaiq has no sha256: the shard is encoded again)
    if not isinstance(state.get("keys"), list):
        return None
    return state


def encode_shard(url: str, out_dir: str, cfg_raw: dict, encoder_digest: str) -> dict:
    """Encode one input shard into `out_dir` under the same name (skipped when already done);
    returns its record: counts and the samples left out with their reasons."""
    out = fs.location(out_dir)
    done = completed(url, out, encoder_digest)
    if done is not None:
        return {**done, "skipped": True}
    cfg = from_dict(EncodeConfig, cfg_raw)
    rep, text, device = load_encoders(cfg)
    data = cfg.data
    num_samples = seconds_to_samples(cfg.clip_seconds)
    left_out: list[dict] = []
    written: list[str] = []  # keys, in tar order
    name = _name(url)

    with fs.atomic_open(out / name, "wb") as f:
        hashing = HashingWriter(f)
        tar = tar_writer(hashing)  # member metadata as export writes it: bytes depend on content only
        pending: list[tuple[int, str, dict, str, np.ndarray]] = []

        def flush():
            if not pending:
                return
            latents, states = encode_batch(rep, text, device, [p[4] for p in pending], [p[3] for p in pending])
            for (pos, key, members, _, _), z, h in zip(pending, latents, states):
                if not (np.isfinite(z).all() and np.isfinite(h).all()):
                    left_out.append({"key": key, "position": pos, "reason": "the latent or text states are not finite"})
                    continue
                tar.write({"__key__": key, S.AUDIO_EXT: members[S.AUDIO_EXT], S.JSON_EXT: members[S.JSON_EXT],
                           P.LATENT_EXT: npy_bytes(z.astype(cfg.dtype)), P.TEXT_EXT: npy_bytes(h.astype(cfg.dtype))})
                written.append(key)
            pending.clear()

        for pos, (key, members, problems) in enumerate(read_shard(url, data.max_member_bytes)):
            try:
                prompt, _ = check_sample(members, problems, data.audio_limit_s)
                wave = decode_audio(members[S.AUDIO_EXT], num_samples, None, data.audio_limit_s)  # (num_samples,)
            except SampleError as e:
                left_out.append({"key": key, "position": pos, "reason": str(e)})
                continue
            pending.append((pos, key, members, prompt, wave))
            if len(pending) >= cfg.batch_size:
                flush()
        flush()
        tar.close()
    shard = out / name
    state = {"shard": name, "count": len(written), "keys": written, "left_out": left_out,
             "input_digest": fs.file_digest(url), "encoder_digest": encoder_digest,
             "bytes": fs.size_and_mtime(shard)[0], "sha256": hashing.hash.hexdigest()}
    fs.atomic_write_text(_state_path(out, name), json.dumps(state, sort_keys=True) + "\n")
    return {**state, "skipped": False}


# --- the run ---------------------------------------------------------------------------------


def _run(calls: list[tuple], cfg: EncodeConfig, local: bool) -> list[dict]:
    """One task per shard through `backend.run_tasks` (with `num_gpus` each on GPUs)."""
    from pipeline import backend

    return backend.run_tasks(encode_shard, calls, desc=STAGE, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                             max_retries=2, unit="shard", local=local)


def main(cfg: EncodeConfig, input_dir: str | Path, output_dir: str | Path, local: bool = False) -> dict[str, Any]:
    """Encode every shard of `input_dir` into `output_dir` (see the module docstring), on the Ray
    the caller started (`local=True`: in this process, no Ray). Returns the report."""
    fs.check_reachable(input_dir, "encode input")
    inp = fs.location(input_dir)
    if not inp.is_dir():
        raise FileNotFoundError(f"input folder {str(input_dir)!r} does not exist (give the folder export wrote)")
    urls = list_shards(str(inp))
    with fs.stage_output(STAGE, input_dir, output_dir) as out:
        fs.remove_temporaries(out)
        # 1. what encodes, the empty prompt, and an info file that says "not complete yet"
        fp = fingerprint(cfg)
        digest = fs.text_digest(json.dumps(fp, sort_keys=True))
        rep = Representation(dataclasses.replace(cfg.representation, latent_scale=1.0))
        text = FrozenTextEncoder(cfg.text)
        empty = prompt_states(text, [""])[0]  # (S0, E)
        frames, bins = rep.latent_size(cfg.clip_seconds)
        info = {"format_version": P.FORMAT_VERSION, P.COMPLETE: False, "input": fs.absolute(input_dir),
                "representation": fp["representation"], "representation_config": to_dict(cfg.representation),
                "text": fp["text"], "text_config": to_dict(cfg.text), "text_dim": text.dim,
                "latent_shape": [rep.latent_channels, frames, bins], "clip_seconds": cfg.clip_seconds,
                "sample_rate": cfg.representation.mel.sample_rate, "dtype": cfg.dtype,
                "latent_scale": "unscaled (the trainer applies its own)", "encoder_digest": digest}
        del rep, text
        fs.atomic_write_text(out / P.INFO_FILE, json.dumps(info, indent=2, sort_keys=True) + "\n")
        with fs.atomic_open(out / P.EMPTY_TEXT_FILE, "wb") as f:
            np.save(f, empty.astype(np.float32), allow_pickle=False)
        names = {_name(u) for u in urls}
        for stale in [p for p in out.glob(f"*{S.SHARD_EXT}") if p.name not in names]:  # shards gone from the input
            stale.unlink()
            _state_path(out, stale.name).unlink(missing_ok=True)

        # 2. one task per shard
        results = _run([(u, str(out), to_dict(cfg), digest) for u in urls], cfg, local)
        fs.remove_temporaries(out)

        # 3. report, sizes/index/checksums, stats, and the info file marked complete
        report = {"input": info["input"], "shards": len(results), "shards_skipped": sum(r["skipped"] for r in results),
                  "samples": sum(r["count"] for r in results),
                  "left_out": [{**x, "shard": r["shard"]} for r in results for x in r["left_out"]]}
        fs.atomic_write_text(out / P.REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")
        write_folder_index(out, [(r["shard"], r["sha256"], r["keys"]) for r in results])
        for stats in sorted(inp.glob(STATS_GLOB), key=lambda p: p.name):
            fs.atomic_write_bytes(out / stats.name, stats.read_bytes())
        fs.atomic_write_text(out / P.INFO_FILE, json.dumps({**info, P.COMPLETE: True}, indent=2, sort_keys=True) + "\n")
    log.info("encode: %d shard(s) (%d already done), %d sample(s), %d left out (see %s)", report["shards"],
             report["shards_skipped"], report["samples"], len(report["left_out"]), P.REPORT_FILE)
    return report


def config_from_training(path: str | None, text_encoder: str | None, **overrides) -> EncodeConfig:
    """An EncodeConfig with the representation, text encoder and clip length of a training YAML."""
    from model.train import TrainConfig

    train = load(TrainConfig, path)
    text = dataclasses.replace(train.text, path=text_encoder or train.text.path)
    base = EncodeConfig(representation=train.representation, text=text, clip_seconds=train.data.clip_seconds,
                        max_member_bytes=train.data.max_member_bytes, max_audio_seconds=train.data.max_audio_seconds)
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def cli(argv: list[str]) -> int:
    from pipeline.raycluster import add_ray_args, init_ray

    p = argparse.ArgumentParser(
        prog="mosaiq encode",
        description="Pre-encode training shards: each sample of the input shards is written again with its "
                    "latent (<key>.latent.npy: the autoencoder's unscaled latent, or the normalised log-mel when "
                    "no autoencoder is configured) and the frozen text encoder's states for its prompt "
                    "(<key>.text.npy), stable-audio-tools' pre-encoded layout inside mosaiq's shards. "
                    "encode_info.json records which representation and text encoder made them; `mosaiq train` "
                    "with the same config then runs neither per step, and refuses shards made with others. "
                    "One Ray task per shard; a finished shard is skipped on a re-run; a sample that cannot be "
                    "encoded is left out and listed with its reason in encode_report.json.",
    )
    p.add_argument("--input", required=True, help="folder of shards (what `mosaiq export` wrote), local or s3:// / gs://")
    p.add_argument("--output", required=True,
                   help="folder for the pre-encoded shards (new, or an earlier encode's), local or s3:// / gs://")
    p.add_argument("--config", help="the training job YAML (its representation, text and data.clip_seconds are used)")
    p.add_argument("--text-encoder", help="local transformers folder of the frozen text encoder (text.path)")
    p.add_argument("--batch-size", type=int, help="clips per encoder call (default 16)")
    p.add_argument("--dtype", choices=P.DTYPES, help="storage of latents and text states (default float32)")
    p.add_argument("--gpu", action="store_true", help="one GPU per task (num_gpus 1), encoders on CUDA")
    p.add_argument("--local", action="store_true", help="run in this process without Ray (small folders, tests)")
    add_ray_args(p)
    a = p.parse_args(argv)
    cfg = config_from_training(a.config, a.text_encoder, batch_size=a.batch_size, dtype=a.dtype,
                               num_gpus=1.0 if a.gpu else None, device="cuda" if a.gpu else None)
    if not a.local:
        init_ray(a.address, a.num_cpus)
    report = main(cfg, a.input, a.output, local=a.local)
    print(json.dumps({k: v for k, v in report.items() if k != "left_out"} | {"left_out": len(report["left_out"])}))
    return 0
