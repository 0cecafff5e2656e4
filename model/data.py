"""Stream training batches from mosaiq WebDataset shards (`<key>.flac` + `<key>.json`).

The stream is endless (epoch after epoch) and fully determined by (seed, rank, worker):
shards are shuffled per epoch with a seed, split across ranks and loader workers, samples pass
an optional quality-weighted filter and a seeded shuffle buffer, and audio is decoded, mixed
to mono, resampled to 16 kHz and cropped or padded to the clip length. Because the torch
DataLoader takes batches from its workers round-robin, a loader can be rebuilt to start at
any batch number (`start_batch`): each worker skips the samples it already delivered, before
decoding them. That is what makes resume exact.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from model.representation import SAMPLE_RATE, seconds_to_samples
from pipeline.audio import resample
from pipeline.fs import derive_seed
from schemas import shard as S
from schemas.tables import CLIP_SECONDS, NUM_QUALITY_LEVELS

log = logging.getLogger(__name__)

AUDIO = "audio"  # batch keys
PROMPTS = "prompts"
QUALITY = "quality"


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are read."""

    shards: str = ""  # a folder of .tar shards, or a brace pattern such as "/d/shard-{000000..000099}.tar"
    clip_seconds: float = CLIP_SECONDS
    batch_size: int = 8  # per rank
    num_workers: int = 4  # loader processes per rank (0: read in the training process)
    shuffle_buffer: int = 512  # samples
    random_crop: bool = True  # False: clips longer than clip_seconds are cut from their start
    # relative sampling weight of quality levels 1..5 (None: every sample once per epoch);
    # a sample is kept with probability weight[level] / max(weight)
    quality_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError(
                f"batch_size {self.batch_size} and shuffle_buffer {self.shuffle_buffer} must be >= 1, "
                f"num_workers {self.num_workers} >= 0"
            )
        if self.quality_weights is not None:
            w = self.quality_weights
            if len(w) != NUM_QUALITY_LEVELS or min(w) < 0 or max(w) <= 0:
                raise ValueError(f"quality_weights must be {NUM_QUALITY_LEVELS} non-negative numbers, not all 0; got {w}")


def list_shards(spec: str) -> list[str]:
    """A folder (its *.tar files, sorted) or a brace pattern -> shard paths."""
    if not spec:
        raise ValueError("data.shards is empty: give a folder of .tar shards or a brace pattern")
    if Path(spec).is_dir():
        urls = sorted(str(p) for p in Path(spec).glob("*.tar"))
    else:
        urls = list(wds.shardlists.expand_urls(spec))
        missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard {missing[0]!r} from {spec!r} does not exist ({len(missing)} missing)")
    if not urls:
        raise FileNotFoundError(f"no .tar shards found at {spec!r}")
    return urls


def _rng(*parts) -> random.Random:
    return random.Random(derive_seed(repr(parts)))


def decode_audio(data: bytes, num_samples: int, rng: random.Random | None) -> np.ndarray:
    """FLAC (or any soundfile format) bytes -> mono float32 at 16 kHz, exactly `num_samples` long.

    A longer clip is cropped at an offset from `rng` (its start when rng is None); a shorter
    one is zero-padded at the end.
    """
    wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (S, ch)
    wave = wave.mean(axis=1)  # (S,)
    if sr != SAMPLE_RATE:
        wave = resample(wave, sr, SAMPLE_RATE)  # (S',)
    if len(wave) > num_samples:
        start = rng.randrange(len(wave) - num_samples + 1) if rng is not None else 0
        wave = wave[start : start + num_samples]
    return np.pad(wave, (0, num_samples - len(wave))).astype(np.float32)  # (num_samples,)


def parse_meta(raw: bytes, key: str) -> tuple[str, int]:
    """The prompt and quality level from one sample's JSON, with errors that name the sample."""
    meta = json.loads(raw)
    prompt, level = meta.get(S.PROMPT), meta.get(S.QUALITY_LEVEL)
    if not isinstance(prompt, str):
        raise ValueError(f"sample {key!r}: field {S.PROMPT!r} is {prompt!r}, expected a string")
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= NUM_QUALITY_LEVELS:
        raise ValueError(f"sample {key!r}: field {S.QUALITY_LEVEL!r} is {level!r}, expected 1..{NUM_QUALITY_LEVELS}")
    return prompt, level


class ShardStream(torch.utils.data.IterableDataset):
    """Endless, seeded stream of batches {audio (B, S), prompts [B], quality (B,)} for one rank."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        super().__init__()
        self.cfg, self.seed, self.rank, self.world_size, self.start_batch = cfg, seed, rank, world_size, start_batch
        self.urls = list_shards(cfg.shards)
        self.num_samples = seconds_to_samples(cfg.clip_seconds)

    def _raw(self, slot: int, slots: int, epoch: int):
        """One epoch of (key, flac bytes, prompt, level) for this slot, before the shuffle buffer."""
        urls = list(self.urls)
        _rng(self.seed, "shards", epoch).shuffle(urls)  # same order in every slot: a consistent partition
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        ds = wds.WebDataset(
            mine, shardshuffle=False, nodesplitter=_all, workersplitter=_all, empty_check=False, seed=self.seed
        )
        for i, sample in enumerate(ds):
            if not by_shard and i % slots != slot:
                continue
            key = sample["__key__"]
            if S.AUDIO_EXT not in sample or S.JSON_EXT not in sample:
                raise ValueError(f"sample {key!r} in {sample.get('__url__')!r} lacks .{S.AUDIO_EXT} or .{S.JSON_EXT}")
            prompt, level = parse_meta(sample[S.JSON_EXT], key)
            yield key, sample[S.AUDIO_EXT], prompt, level

    def _samples(self, slot: int, slots: int):
        """Endless filtered, shuffled samples for this slot."""
        w = self.cfg.quality_weights
        for epoch in range(10**9):
            keep_rng = _rng(self.seed, "keep", slot, epoch)
            shuf_rng = _rng(self.seed, "shuffle", slot, epoch)
            buffer, seen = [], 0
            for item in self._raw(slot, slots, epoch):
                seen += 1
                if w is not None and keep_rng.random() >= w[item[3] - 1] / max(w):
                    continue
                buffer.append(item)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(shuf_rng.randrange(len(buffer)))
            if seen == 0:
                raise RuntimeError(f"rank {self.rank} loader slot {slot} of {slots} got no samples from {len(self.urls)} shard(s)")
            shuf_rng.shuffle(buffer)
            yield from buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # the loader takes batches round-robin from worker 0 on, so stream batch g comes from
        # logical worker g % nw; a loader restarted at start_batch shifts the roles to match
        logical = (wid + self.start_batch) % nw
        slot, slots = self.rank * nw + logical, self.world_size * nw
        done = len(range(logical, self.start_batch, nw))  # batches this role delivered before start_batch
        skip = done * self.cfg.batch_size
        batch, n = [], 0
        for key, flac, prompt, level in self._samples(slot, slots):
            n += 1
            if n <= skip:
                continue
            crop_rng = _rng(self.seed, "crop", slot, n) if self.cfg.random_crop else None
            batch.append((decode_audio(flac, self.num_samples, crop_rng), prompt, level))
            if len(batch) == self.cfg.batch_size:
                yield {
                    AUDIO: torch.from_numpy(np.stack([b[0] for b in batch])),  # (B, S)
                    PROMPTS: [b[1] for b in batch],
                    QUALITY: torch.tensor([b[2] for b in batch], dtype=torch.long),  # (B,)
                }
                batch = []


def _all(src):
    return src


def make_loader(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
    """A DataLoader over `ShardStream`; iterate it for batches, forever."""
    stream = ShardStream(cfg, seed, rank, world_size, start_batch)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=4 if cfg.num_workers else None
    )
