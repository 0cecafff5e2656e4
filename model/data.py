"""Stream training batches from mosaiq WebDataset shards (`<key>.flac` + `<key>.json`).

Shards written by `mosaiq encode` (model/preencoded.py) also carry each sample's latent and
text states; the stream then yields those (batch keys `latent`, `text`, `text_mask`) and never
decodes audio, so the trainer runs neither the autoencoder nor the text encoder.

The stream is endless (epoch after epoch) and fully determined by (seed, rank, worker):
shards are shuffled per epoch with a seed, split across ranks and loader workers, samples pass
an optional quality-weighted filter and a seeded shuffle buffer, and audio is decoded, mixed
to mono, resampled to 16 kHz and cropped or padded to the clip length. Because the torch
DataLoader takes batches from its workers round-robin, a loader can be rebuilt to start at
any batch number (`start_batch`): each worker skips the samples it already delivered, before
decoding them. That is what makes resume exact.

Shards may lie on disk or in object storage (`s3://bucket/shards`, `gs://...`, a folder or a
brace pattern): those are listed and streamed through `pipeline.fs` (an fsspec file read front
to back, never downloaded whole); `pipe:` commands and http URLs go to `webdataset.gopen`.

The shards are not trusted. A tar is read as a stream and nothing is extracted to disk;
members are checked as `mosaiq verify` checks them (names `<key>.flac`, `<key>.json` or
`<key>.latent.npy`, `<key>.text.npy` with a key matching `schemas.shard.KEY_RE`, no `/`, `\\` or `..`, regular
files only, no extra members) before their bytes are read, and one larger than
`max_member_bytes` is never read. Audio must be FLAC, and audio longer than
`max_audio_seconds` is refused by its header, or while it is read when the header gives no
length, so no member is decoded beyond that. A bad sample is skipped and logged once; when a
loader worker has met more than `max_bad_samples` of them, training stops with
`TooManyBadSamples`, naming each shard, sample and reason.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

from model import preencoded as P
from model.representation import SAMPLE_RATE, seconds_to_samples
from pipeline.audio import UNKNOWN_FRAMES, AudioError, read_sequential, resample
from pipeline import fs
from pipeline.fs import derive_seed
from schemas import shard as S
from schemas.tables import CLIP_SECONDS, NUM_QUALITY_LEVELS

log = logging.getLogger(__name__)

AUDIO = "audio"  # batch keys
PROMPTS = "prompts"
QUALITY = "quality"
LATENT = "latent"  # pre-encoded shards: unscaled latents (B, C, T', F')
TEXT = "text"  # pre-encoded shards: text states (B, S, E), padded to the batch's longest
TEXT_MASK = "text_mask"  # (B, S) bool, True = a real token

SAMPLE_EXTS = (S.AUDIO_EXT, S.JSON_EXT, P.LATENT_EXT, P.TEXT_EXT)  # the members a sample may have
AUDIO_MARGIN_S = 2.0  # default max_audio_seconds: the longer of clip_seconds and CLIP_SECONDS, plus this
FLAC_MAGIC = b"fLaC"
_READ_BLOCK = 1 << 16  # frames decoded at a time


class SampleError(ValueError):
    """One sample cannot be used (the reason is the message); the loader skips and counts it."""


class TooManyBadSamples(ValueError):
    """More bad samples than `DataConfig.max_bad_samples`: training stops."""


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are read."""

    shards: str = ""  # a folder of .tar shards or a brace pattern ("/d/shard-{000000..000099}.tar"), local or s3:// / gs://
    clip_seconds: float = CLIP_SECONDS
    batch_size: int = 8  # per rank
    num_workers: int = 4  # loader processes per rank (0: read in the training process)
    shuffle_buffer: int = 512  # samples
    random_crop: bool = True  # False: clips longer than clip_seconds are cut from their start
    # relative sampling weight of quality levels 1..5 (None: every sample once per epoch);
    # a sample is kept with probability weight[level] / max(weight)
    quality_weights: tuple[float, ...] | None = None
    # audio longer than this is refused unread (None: the longer of clip_seconds and the
    # pipeline's CLIP_SECONDS, plus AUDIO_MARGIN_S); a tar member larger than max_member_bytes
    # is refused unread
    max_audio_seconds: float | None = None
    max_member_bytes: int = 32 << 20  # 10 s of 24-bit stereo FLAC at 384 kHz is under 24 MB
    # bad samples (unsafe or extra members, corrupt audio or JSON, too long) are skipped and
    # logged; training stops when one loader worker has met more than this many different ones
    max_bad_samples: int = 10
    # shards from `mosaiq encode`: None reads their latents and text states when the folder has
    # an encode_info.json (and decodes audio otherwise); False always decodes the audio; True
    # requires pre-encoded shards
    pre_encoded: bool | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError(
                f"batch_size {self.batch_size} and shuffle_buffer {self.shuffle_buffer} must be >= 1, "
                f"num_workers {self.num_workers} >= 0"
            )
        if self.max_audio_seconds is not None and not self.max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds must be > 0 (or null for the default), got {self.max_audio_seconds}")
        if self.max_member_bytes < 1 or self.max_bad_samples < 0:
            raise ValueError(f"max_member_bytes {self.max_member_bytes} must be >= 1 and max_bad_samples {self.max_bad_samples} >= 0")
        if self.quality_weights is not None:
            w = self.quality_weights
            if len(w) != NUM_QUALITY_LEVELS or min(w) < 0 or max(w) <= 0:
                raise ValueError(f"quality_weights must be {NUM_QUALITY_LEVELS} non-negative numbers, not all 0; got {w}")

    @property
    def audio_limit_s(self) -> float:
        """Audio longer than this many seconds is refused."""
        if self.max_audio_seconds is not None:
            return self.max_audio_seconds
        return max(self.clip_seconds, CLIP_SECONDS) + AUDIO_MARGIN_S


def in_storage(url: str) -> bool:
    """True for object storage (`s3://`, `gs://`...), which `pipeline.fs` opens."""
    return fs.protocol(url) in fs.STORAGE_PROTOCOLS


def webdataset_url(url: str) -> bool:
    """True for what only `webdataset.gopen` opens (`pipe:` commands, http(s)://): not listed,
    not checked, streamed as they are."""
    return url.startswith("pipe:") or fs.protocol(url) not in ("", *fs.STORAGE_PROTOCOLS)


def _missing(urls: list[str]) -> list[str]:
    """The shards of an expanded brace pattern that do not exist (in object storage: one
    listing per folder, not one request per shard)."""
    if not in_storage(urls[0]):
        return [u for u in urls if not fs.location(u).is_file()]
    names: dict[str, set[str]] = {}
    for u in urls:
        folder = u.rpartition("/")[0]
        if folder not in names:
            loc = fs.location(folder)
            names[folder] = {p.name for p in loc.iterdir()} if loc.is_dir() else set()
    return [u for u in urls if u.rpartition("/")[2] not in names[u.rpartition("/")[0]]]


def list_shards(spec: str) -> list[str]:
    """A folder (its *.tar files, sorted) or a brace pattern -> shard paths or URLs. The folder
    may be local, `file://` or in object storage (`s3://bucket/shards`)."""
    if not spec:
        raise ValueError("data.shards is empty: give a folder of .tar shards or a brace pattern")
    if webdataset_url(spec):
        urls = list(wds.shardlists.expand_urls(spec))
    elif fs.location(spec).is_dir():
        urls = sorted(str(p) for p in fs.location(spec).glob("*.tar"))
    else:
        urls = list(wds.shardlists.expand_urls(spec))
        missing = _missing(urls)
        if missing:
            raise FileNotFoundError(f"shard {missing[0]!r} from {spec!r} does not exist ({len(missing)} missing)")
    if not urls:
        raise FileNotFoundError(f"no .tar shards found at {spec!r}")
    return urls


def shards_folder(spec: str) -> Path:
    """The folder the shards of `spec` (a folder or a brace pattern) lie in: a `pathlib.Path`,
    or a `upath.UPath` in object storage."""
    if not webdataset_url(spec) and fs.location(spec).is_dir():
        return fs.location(spec)
    first = list_shards(spec)[0]
    return Path(first).parent if webdataset_url(first) else fs.location(first).parent


def pre_encoded_info(cfg: DataConfig) -> dict | None:
    """The shards' `encode_info.json` when the stream reads latents and text states, else None."""
    info = P.read_info(shards_folder(cfg.shards)) if cfg.pre_encoded is not False else None
    if cfg.pre_encoded and info is None:
        raise ValueError(f"data.pre_encoded is true but {str(shards_folder(cfg.shards))!r} holds no {P.INFO_FILE}: "
                         "write pre-encoded shards with `mosaiq encode`")
    return info


def _rng(*parts) -> random.Random:
    return random.Random(derive_seed(repr(parts)))


# --- one sample ------------------------------------------------------------------------------


def _decoder_message(e: Exception) -> str:
    # libsndfile says "Error opening <_io.BytesIO object at 0x...>: " before its reason
    return re.sub(r"^Error opening .*?: ", "", str(e)).strip() or type(e).__name__


def audio_header(data: bytes, max_seconds: float | None = None) -> tuple[int, int]:
    """(sample rate, frames; 0 when the header gives no length) of FLAC bytes, from the header
    alone. SampleError when the bytes are not FLAC or the header says more than `max_seconds`."""
    if data[:4] != FLAC_MAGIC:  # before libsndfile, which would try every other format's decoder
        raise SampleError(f"audio is not a FLAC stream (it starts {data[:4]!r})")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise SampleError(f"FLAC header does not parse: {_decoder_message(e)}") from e
    frames = info.frames if 0 < info.frames < UNKNOWN_FRAMES else 0
    if max_seconds is not None and frames > max_seconds * info.samplerate:
        raise SampleError(f"audio is {frames / info.samplerate:.1f} s, longer than data.max_audio_seconds {max_seconds:g} s")
    return info.samplerate, frames


def _read_at_most(f: sf.SoundFile, limit: int | None) -> np.ndarray:
    """All frames of `f`, read front to back block by block; SampleError past `limit` frames. (S, ch)"""
    try:
        return read_sequential(f, 0, None, block=_READ_BLOCK, max_frames=limit)
    except AudioError:
        raise SampleError(f"audio is longer than data.max_audio_seconds: more than {limit} frames at {f.samplerate} Hz "
                          f"(its header gives no length, or a shorter one)") from None


def decode_audio(data: bytes, num_samples: int, rng: random.Random | None, max_seconds: float | None = None) -> np.ndarray:
    """FLAC bytes -> mono float32 at 16 kHz, exactly `num_samples` long.

    A longer clip is cropped at an offset from `rng` (its start when rng is None); a shorter
    one is zero-padded at the end. SampleError when the bytes are not FLAC, do not decode, or
    hold more than `max_seconds` of audio: refused by the header, or (when the header gives no
    length) as soon as the decoded frames pass it.
    """
    sr, _ = audio_header(data, max_seconds)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            wave = _read_at_most(f, None if max_seconds is None else int(max_seconds * sr))  # (S, ch)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise SampleError(f"audio does not decode: {_decoder_message(e)}") from e
    wave = wave.mean(axis=1)  # (S,)
    if sr != SAMPLE_RATE:
        wave = resample(wave, sr, SAMPLE_RATE)  # (S',)
    if len(wave) > num_samples:
        start = rng.randrange(len(wave) - num_samples + 1) if rng is not None else 0
        wave = wave[start : start + num_samples]
    return np.pad(wave, (0, num_samples - len(wave))).astype(np.float32)  # (num_samples,)


def load_array(data: bytes, what: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """A float32 copy of the float16/float32 `.npy` bytes of a pre-encoded member, whose shape
    must match `shape` (None: any size >= 1); never unpickles. SampleError says what is wrong."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SampleError(f"{what} is not a readable .npy array: {e}") from e
    if arr.dtype.name not in P.DTYPES:
        raise SampleError(f"{what} has dtype {arr.dtype}, expected one of {P.DTYPES}")
    if arr.ndim != len(shape) or any(n != m if m is not None else n < 1 for n, m in zip(arr.shape, shape)):
        raise SampleError(f"{what} has shape {arr.shape}, expected {tuple('any' if m is None else m for m in shape)}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise SampleError(f"{what} holds NaN or infinite values")
    return arr


def parse_meta(raw: bytes) -> tuple[str, int]:
    """The prompt and quality level from one sample's JSON; SampleError says what is wrong."""
    try:
        meta = json.loads(raw)
    except ValueError as e:  # also bytes that are not UTF-8
        raise SampleError(f"JSON does not parse: {e}") from e
    if not isinstance(meta, dict):
        raise SampleError(f"JSON is {type(meta).__name__}, not an object")
    prompt, level = meta.get(S.PROMPT), meta.get(S.QUALITY_LEVEL)
    if not isinstance(prompt, str):
        raise SampleError(f"field {S.PROMPT!r} is {prompt!r}, expected a string")
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= NUM_QUALITY_LEVELS:
        raise SampleError(f"field {S.QUALITY_LEVEL!r} is {level!r}, expected 1..{NUM_QUALITY_LEVELS}")
    return prompt, level


# --- one shard -------------------------------------------------------------------------------


def _shown(name: str, limit: int = 120) -> str:
    """A name from a shard as messages show it: quoted, escaped and cut short."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def member_problem(m: tarfile.TarInfo, key: str, ext: str, max_bytes: int) -> str | None:
    """Why a sample may not hold this tar member (None: it may), from the member's header alone:
    the checks of `mosaiq verify`, and a size limit."""
    name = _shown(m.name)
    if "/" in m.name or "\\" in m.name or ".." in m.name:
        return f"member {name}: refused name (contains '/', '\\' or '..')"
    if not m.isfile():
        return f"member {name} is not a regular file"
    if not S.KEY_RE.fullmatch(key) or ext not in SAMPLE_EXTS:
        return f"member {name} is not <key>.{{{','.join(SAMPLE_EXTS)}}} with a key matching {S.KEY_RE.pattern}"
    if m.size > max_bytes:
        return f"member {name} is {m.size} bytes, over data.max_member_bytes {max_bytes}"
    return None


def _open_shard(url: str):
    """The shard's bytes as a stream: an fsspec file from object storage, else `webdataset.gopen`
    (local paths, `pipe:` commands, http)."""
    if in_storage(url):
        return fs.location(url).open("rb")
    return wds.gopen(url)


def read_shard(url: str, max_member_bytes: int):
    """(key, members by extension, problems) for each run of adjacent tar members with one key.

    The tar is read as a stream and nothing is written to disk; a member that fails
    `member_problem` is never read. A tar that is cut short or does not parse ends with an
    item (its last, possibly partial, sample) that says so.
    """
    seen: set[str] = set()
    key, members, problems = None, {}, []
    try:
        with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                mkey, _, ext = m.name.partition(".")
                if mkey != key:
                    if key is not None:
                        yield key, members, problems
                    key, members, problems = mkey, {}, []
                    if mkey in seen:
                        problems.append("the sample appears twice or its members are not adjacent")
                    seen.add(mkey)
                problem = member_problem(m, mkey, ext, max_member_bytes)
                if problem is None and ext in members:
                    problem = f"two .{ext} members"
                if problem is not None:
                    problems.append(problem)
                    continue
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {_shown(m.name)} holds {len(data)} of {m.size} bytes")
                members[ext] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        key = "" if key is None else key
        problems.append(f"the tar is cut short or corrupt here: {e}")
    if key is not None:
        yield key, members, problems


def check_sample(members: dict[str, bytes], problems: list[str], max_seconds: float,
                 encoded: bool = False) -> tuple[str, int]:
    """The prompt and level of a sample that has its members (latent and text states instead of
    audio when `encoded`), no problem and an audio header within limits (nothing is decoded);
    SampleError otherwise."""
    needed = (S.JSON_EXT, P.LATENT_EXT, P.TEXT_EXT) if encoded else (S.AUDIO_EXT, S.JSON_EXT)
    missing = [f".{ext}" for ext in needed if ext not in members]
    if missing and not problems:
        problems = [f"no {' or '.join(missing)} member"]
    if problems:
        raise SampleError("; ".join(problems))
    prompt, level = parse_meta(members[S.JSON_EXT])
    if not encoded:
        audio_header(members[S.AUDIO_EXT], max_seconds)
    return prompt, level


class _Sample(NamedTuple):
    url: str
    pos: int  # position of the sample in its shard (keys of bad samples need not be unique)
    key: str
    members: dict[str, bytes]
    prompt: str
    level: int


@dataclass
class BadSamples:
    """The different bad samples one loader worker met; more than `limit` stops training."""

    limit: int
    where: str  # which worker, for the message
    seen: dict[tuple[str, int], str] = field(default_factory=dict)  # (shard, position) -> "sample 'key': reasons"

    def add(self, url: str, pos: int, key: str, reason: str) -> None:
        if (url, pos) in self.seen:  # met again in a later epoch
            return
        self.seen[url, pos] = f"sample {_shown(key)}: {reason}"
        log.warning("skipped bad sample %d (at most %d): %s: %s", len(self.seen), self.limit, url, self.seen[url, pos])
        if len(self.seen) > self.limit:
            listed = "; ".join(f"{u}: {what}" for (u, _), what in self.seen.items())
            raise TooManyBadSamples(
                f"{len(self.seen)} bad samples, more than data.max_bad_samples {self.limit} ({self.where}); "
                f"training stops. Check the shards with `mosaiq verify`. The samples: {listed}"
            )


# --- the stream ------------------------------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """Endless, seeded stream of batches {audio (B, S), prompts [B], quality (B,)} for one rank;
    from pre-encoded shards {latent (B, C, T', F'), text (B, S, E), text_mask (B, S), prompts,
    quality} instead."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
        super().__init__()
        self.cfg, self.seed, self.rank, self.world_size, self.start_batch = cfg, seed, rank, world_size, start_batch
        self.urls = list_shards(cfg.shards)
        self.num_samples = seconds_to_samples(cfg.clip_seconds)
        self.encoded = pre_encoded_info(cfg)  # None: decode the audio
        self.inputs = (S.AUDIO_EXT,) if self.encoded is None else (P.LATENT_EXT, P.TEXT_EXT)  # members a batch is made of

    def _raw(self, slot: int, slots: int, epoch: int, bad: BadSamples):
        """One epoch of this slot's samples that pass every check short of decoding, before the
        shuffle buffer; the others go to `bad`."""
        urls = list(self.urls)
        _rng(self.seed, "shards", epoch).shuffle(urls)  # same order in every slot: a consistent partition
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        i = -1
        for url in mine:
            for pos, (key, members, problems) in enumerate(read_shard(url, self.cfg.max_member_bytes)):
                i += 1
                if not by_shard and i % slots != slot:
                    continue
                try:
                    prompt, level = check_sample(members, problems, self.cfg.audio_limit_s, self.encoded is not None)
                except SampleError as e:
                    bad.add(url, pos, key, str(e))
                    continue
                kept = {ext: members[ext] for ext in self.inputs}  # the shuffle buffer holds only what is used
                yield _Sample(url, pos, key, kept, prompt, level)

    def _samples(self, slot: int, slots: int, bad: BadSamples):
        """Endless filtered, shuffled samples for this slot."""
        w = self.cfg.quality_weights
        for epoch in range(10**9):
            keep_rng = _rng(self.seed, "keep", slot, epoch)
            shuf_rng = _rng(self.seed, "shuffle", slot, epoch)
            buffer, seen = [], 0
            for item in self._raw(slot, slots, epoch, bad):
                seen += 1
                if w is not None and keep_rng.random() >= w[item.level - 1] / max(w):
                    continue
                buffer.append(item)
                if len(buffer) >= self.cfg.shuffle_buffer:
                    yield buffer.pop(shuf_rng.randrange(len(buffer)))
            if seen == 0:
                raise RuntimeError(f"rank {self.rank} loader slot {slot} of {slots} got no samples from {len(self.urls)} shard(s)"
                                   f" ({len(bad.seen)} bad sample(s) skipped)")
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
        bad = BadSamples(self.cfg.max_bad_samples, f"rank {self.rank}, loader slot {slot} of {slots}")
        size = self.cfg.batch_size
        batch, failed, n, warned = [], 0, 0, False
        for s in self._samples(slot, slots, bad):
            n += 1
            if n <= skip:
                continue
            try:
                batch.append((*self._inputs(s, slot, n), s.prompt, s.level))
            except SampleError as e:
                bad.add(s.url, s.pos, s.key, str(e))
                failed += 1
            if len(batch) + failed < size:
                continue
            if not batch:
                if not warned:
                    log.warning("%s: no sample of a batch of %d decodes, so the batch takes the next samples of the "
                                "stream: a restart from a later batch will not continue this stream exactly", bad.where, size)
                warned, failed = True, 0
                continue
            # a sample that failed gives its place to another of the batch: every batch covers
            # the same batch_size stream positions, so a restart stays exact
            batch += [batch[i % len(batch)] for i in range(failed)]
            yield self._collate(batch)
            batch, failed = [], 0

    def _inputs(self, s: _Sample, slot: int, n: int) -> tuple[np.ndarray, ...]:
        """(wave (S,),) decoded and cropped, or (latent (C, T', F'), text (S, E)) of a pre-encoded sample."""
        if self.encoded is None:
            crop_rng = _rng(self.seed, "crop", slot, n) if self.cfg.random_crop else None
            return (decode_audio(s.members[S.AUDIO_EXT], self.num_samples, crop_rng, self.cfg.audio_limit_s),)
        latent = load_array(s.members[P.LATENT_EXT], f".{P.LATENT_EXT}", tuple(self.encoded["latent_shape"]))
        text = load_array(s.members[P.TEXT_EXT], f".{P.TEXT_EXT}", (None, self.encoded["text_dim"]))
        return latent, text

    def _collate(self, batch: list[tuple]) -> dict:
        out = {PROMPTS: [b[-2] for b in batch], QUALITY: torch.tensor([b[-1] for b in batch], dtype=torch.long)}  # (B,)
        if self.encoded is None:
            out[AUDIO] = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, S)
            return out
        out[LATENT] = torch.from_numpy(np.stack([b[0] for b in batch]))  # (B, C, T', F')
        out[TEXT], out[TEXT_MASK] = pad_states([torch.from_numpy(b[1]) for b in batch])  # (B, S, E), (B, S)
        return out


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states [(S_i, E)] -> zero-padded (B, max S_i, E) and mask (B, max S_i), True = real."""
    longest = max(len(h) for h in states)
    y = torch.zeros(len(states), longest, states[0].shape[1], dtype=states[0].dtype)  # (B, S, E)
    mask = torch.zeros(len(states), longest, dtype=torch.bool)  # (B, S)
    for i, h in enumerate(states):
        y[i, : len(h)] = h
        mask[i, : len(h)] = True
    return y, mask


def make_loader(cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0):
    """A DataLoader over `ShardStream`; iterate it for batches, forever."""
    stream = ShardStream(cfg, seed, rank, world_size, start_batch)
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.num_workers, prefetch_factor=4 if cfg.num_workers else None
    )
