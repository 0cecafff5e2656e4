"""Writing one WebDataset shard: decode each planned clip, encode FLAC, write a reproducible tar.

`write_shard(spec, out_dir)` is what one export task runs (`pipeline/export.py` plans the
shards and runs these tasks through `pipeline.backend.run_tasks`; tests call it in-process).
The tar is written by `webdataset.TarWriter` with member metadata that depends on content
only (mtime 0, uid/gid 0, empty user and group names, mode 0644, members in plan order, flac
before json), under a temporary name (`pipeline.fs.atomic_open`), and hashed while it is
written. A record in `<out>/.export_state/<shard>.json` (plan digest, bytes, sha256) marks the
shard complete; a shard whose record matches the plan and whose bytes match the record is
skipped, so a killed run resumes. A clip whose audio cannot be read any more is left out of
the shard with its reason (`FAILED_REASON: ...`), and the shard is tried again on a re-run.

`write_folder_index` writes what a folder of shards carries beside them (`sizes.json`,
`SHA256SUMS`, `index.parquet`); export and `mosaiq encode` both call it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline import fs
from schemas import shard as S
from schemas import tables as T

# Bump when the shard bytes change for the same plan (it is part of every shard's plan digest,
# so a re-run rewrites shards of an older format). Version 1 was written with tarfile (USTAR);
# webdataset.TarWriter writes the same bytes (tests/pipeline/test_export.py pins them).
EXPORT_FORMAT_VERSION = 1
FAILED_REASON = "export decode failed"  # reason of an ok row whose audio cannot be read any more

# Member metadata that makes tar bytes depend on content only.
TAR_MTIME = 0
TAR_MODE = 0o644
TAR_END_BYTES = tarfile.RECORDSIZE  # end-of-archive blocks plus padding, at most
SAMPLE_OVERHEAD_BYTES = 4 * tarfile.BLOCKSIZE + 8192  # two headers, two paddings, FLAC headers
FLAC_BYTES_PER_SAMPLE = {"PCM_16": 2, "PCM_24": 3}


class ChangedError(Exception):
    """A clip's file is not the one ingest saw (its content digest differs): the row's reason."""


class ExportError(ValueError):
    """The input cannot be exported as it is (bad key, bad row, audio that no longer matches)."""


@dataclass(frozen=True)
class SampleSpec:
    """One sample to write: where its audio is and its JSON bytes."""

    key: str
    audio_path: str
    source_digest: str
    source_rate: int
    start_frame: int  # at the source rate
    frames: int  # at the source rate
    out_frames: int  # at the export rate
    json_bytes: bytes


@dataclass(frozen=True)
class ShardSpec:
    """One shard as planned by the driver."""

    name: str
    samples: tuple[SampleSpec, ...]
    est_bytes: int
    sample_rate: int | None
    mono: bool
    flac_subtype: str

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([EXPORT_FORMAT_VERSION, self.name, self.sample_rate, self.mono, self.flac_subtype]).encode())
        for s in self.samples:
            h.update(json.dumps([s.key, s.audio_path, s.source_digest, s.source_rate, s.start_frame, s.frames, s.out_frames]).encode())
            h.update(hashlib.sha256(s.json_bytes).digest())
        return h.hexdigest()


@dataclass(frozen=True)
class ShardResult:
    name: str
    count: int  # samples written
    bytes: int
    sha256: str
    skipped: bool
    failed: tuple[tuple[str, str], ...] = ()  # (key, reason) of planned samples that could not be read


def check_key(key) -> str:
    """A sample key, or ExportError: no dots, no `/`, no `..`, only [A-Za-z0-9_-], at most 90."""
    if not isinstance(key, str) or not S.KEY_RE.match(key):
        raise ExportError(f"refusing sample key {key!r}: keys must match {S.KEY_RE.pattern} (no dots, no '/', no '..')")
    return key


def check_identity(s: SampleSpec, seen: dict[str, str]) -> None:
    """Raise ChangedError unless the file still has the content digest ingest recorded (the
    export reads whole files anyway; `seen` keeps one digest per file for a shard)."""
    if not s.source_digest:
        return
    if s.audio_path not in seen:
        try:
            seen[s.audio_path] = fs.file_digest(s.audio_path)
        except OSError:
            return  # gone or unreadable: the decode reports it with the decoder's reason
    if seen[s.audio_path] != s.source_digest:
        raise ChangedError(f"{T.CHANGED_SINCE_INGEST}: content digest {seen[s.audio_path]} is not "
                           f"{s.source_digest} (the file was edited or swapped)")


def load_clip(s: SampleSpec, sample_rate: int | None, mono: bool) -> np.ndarray:
    """Decode one clip to float32 (frames, channels) at the export rate (`pipeline.audio`
    decodes, pads a lossy header's small overstatement and resamples, as for scoring)."""
    from pipeline import audio as A

    try:
        audio = A.load_clip(s.audio_path, s.start_frame / s.source_rate, s.frames / s.source_rate, sample_rate,
                            mono=mono, expected_sr=s.source_rate)
    except A.AudioError as e:
        raise ExportError(f"clip {s.key!r}: {s.audio_path!r}: {e.reason}") from e
    audio = audio[:, None] if mono else audio.T  # (frames, channels)
    if len(audio) != s.out_frames:  # resampling rounds; the JSON declares round(duration * rate)
        audio = audio[: s.out_frames] if len(audio) > s.out_frames else np.pad(audio, ((0, s.out_frames - len(audio)), (0, 0)))
    return np.clip(audio, -1.0, 1.0)


def encode_flac(audio: np.ndarray, rate: int, subtype: str) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="FLAC", subtype=subtype)
    return buf.getvalue()


def state_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / S.STATE_DIR / f"{shard_name}.json"


def completed(spec: ShardSpec, out_dir: Path) -> ShardResult | None:
    """The result of an earlier complete write of exactly this shard, or None."""
    path, marker = out_dir / spec.name, state_path(out_dir, spec.name)
    if not (path.is_file() and marker.is_file()):
        return None
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if state.get("digest") != spec.digest() or state.get("bytes") != fs.size_and_mtime(path)[0]:
        return None
    if fs.sha256_file(path) != state.get("sha256"):
        return None
    if state.get("failed"):  # some audio could not be read last time: try again (it may be back)
        return None
    return ShardResult(spec.name, len(spec.samples), state["bytes"], state["sha256"], skipped=True)


class HashingWriter:
    """A write-only file that hashes what passes through (TarWriter streams into it)."""

    def __init__(self, f):
        self.f, self.hash = f, hashlib.sha256()

    def write(self, b) -> int:
        self.hash.update(b)
        return self.f.write(b)


def tar_writer(f):
    """A `webdataset.TarWriter` over the open file `f` whose bytes depend on content only."""
    import webdataset as wds

    # encoder=False: values are bytes already; compress=False: a plain tar ("w|")
    return wds.TarWriter(f, user="", group="", mode=TAR_MODE, mtime=TAR_MTIME, encoder=False, compress=False)


def write_folder_index(out, written: list[tuple[str, str, list[str]]]) -> None:
    """`sizes.json`, `SHA256SUMS` and `index.parquet` for the shards `written`, each given as
    (file name, sha256, its sample keys in tar order), in the order they are listed. Each file
    is written atomically and only when its bytes change: a re-run that finds every shard done
    rewrites nothing."""
    out = fs.location(out)
    sizes = {name: len(keys) for name, _, keys in written}
    fs.write_if_changed(out / S.SIZES_FILE, (json.dumps(sizes, indent=2, sort_keys=True) + "\n").encode())
    fs.write_if_changed(out / S.CHECKSUMS_FILE, "".join(f"{sha}  {name}\n" for name, sha, _ in written).encode())
    rows = [(key, name, pos) for name, _, keys in written for pos, key in enumerate(keys)]
    ids, shards, positions = zip(*rows) if rows else ((), (), ())
    index = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(shards, pa.string()),
                                  pa.array(positions, pa.int32())], schema=S.INDEX_SCHEMA)
    fs.write_if_changed(out / S.INDEX_FILE, fs.table_bytes(index))


def write_shard(spec: ShardSpec, out_dir: str) -> ShardResult:
    """Write one shard under a temporary name and rename it; skip it if already complete."""
    out = fs.location(out_dir)
    done = completed(spec, out)
    if done is not None:
        return done
    final = out / spec.name
    failed: list[tuple[str, str]] = []
    digests: dict[str, str] = {}
    with fs.atomic_open(final, "wb") as raw:
        hashing = HashingWriter(raw)
        with tar_writer(hashing) as tar:
            for s in spec.samples:
                rate = spec.sample_rate or s.source_rate
                try:  # audio that changed or went away since ingest: this sample's error, not the run's
                    check_identity(s, digests)
                    audio = load_clip(s, spec.sample_rate, spec.mono)
                except ChangedError as e:  # never exported under the old labels
                    failed.append((s.key, str(e)))
                    continue
                except ExportError as e:
                    failed.append((s.key, f"{FAILED_REASON}: {e}"))
                    continue
                flac = encode_flac(audio, rate, spec.flac_subtype)
                # TarWriter writes the members in sorted extension order: <key>.flac, <key>.json
                tar.write({"__key__": check_key(s.key), S.AUDIO_EXT: flac, S.JSON_EXT: s.json_bytes})
        raw.flush()
        os.fsync(raw.fileno())
    size = fs.size_and_mtime(final)[0]
    sha = hashing.hash.hexdigest()
    count = len(spec.samples) - len(failed)
    state = {"digest": spec.digest(), "bytes": size, "sha256": sha, "count": count, "failed": failed}
    fs.atomic_write_text(state_path(out, spec.name), json.dumps(state, sort_keys=True) + "\n")
    return ShardResult(spec.name, count, size, sha, skipped=False, failed=tuple(failed))
