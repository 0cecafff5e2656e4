"""`mosaiq verify SHARDS_DIR`: re-read every shard and check it against the folder's records.

Checks, per shard: the tar reads to its end-of-archive blocks (a truncated shard fails); every
member is a regular file with a safe name (no `/`, no `..`, a key without dots and a known
extension); the members of a sample are adjacent; every sample has audio and JSON; the JSON
matches schemas/shard.py, names its own key and the stats id of the folder; the FLAC decodes to
the declared rate and length (round(seconds_total * sample_rate) frames). Across the folder:
counts match `sizes.json`, clips and positions match `index.parquet`, bytes match `SHA256SUMS`,
and no temporary file of a killed run is left. Nothing is extracted to disk and nothing is
written. Exits 1 with the list of problems, 0 when there are none.

A folder `mosaiq encode` wrote is recognised by its `encode_info.json`, which must say the run
finished. Every sample there also has `<key>.latent.npy` and `<key>.text.npy` (model/preencoded.py);
each must load with `np.load(..., allow_pickle=False)` as a finite float array, latents (C, T', F')
and text states (S, E); all latents of the folder share one shape and dtype, all text states
one width E and dtype (a sample that differs from the folder's most common is named).

As a `curate` stage, `main(cfg, input_dir, output_dir)` verifies `input_dir` (the shards folder
export wrote), returns a `StageReport` and raises `VerifyError` when there are problems.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jobs import config as jobconfig
from pipeline import fs
from pipeline.stage import StageReport
from schemas import shard as S
from schemas import stats as Q
from schemas import tables as T

log = logging.getLogger(__name__)

SAMPLE_EXTS = (S.AUDIO_EXT, S.JSON_EXT, S.LATENT_EXT, S.TEXT_EXT)
ARRAY_DIMS = {S.LATENT_EXT: 3, S.TEXT_EXT: 2}  # pre-encoded members: (C, T', F') and (S, E)


@dataclass(frozen=True)
class VerifyConfig:
    """What to verify; the only defaults."""

    shards_dir: str = ""  # the folder to verify; "" as a curate stage, which passes its input folder
    max_problems_shown: int = 200  # the CLI prints at most this many (the count is always shown)


@dataclass
class ShardCheck:
    name: str
    keys: list[str] = field(default_factory=list)  # complete samples, in tar order
    problems: list[str] = field(default_factory=list)
    sha256: str = ""
    arrays: dict[str, dict[str, tuple[tuple[int, ...], str]]] = field(default_factory=dict)  # key -> ext -> (shape, dtype)


class VerifyError(RuntimeError):
    """Verify found problems in a folder that a curate run just wrote."""


@dataclass
class VerifyResult(StageReport):
    """What verify found; a StageReport (one part per shard, nothing written) for `curate`."""

    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_sample(key: str, members: dict[str, bytes], stats_id: str | None) -> list[str]:
    """Problems with one sample (its members by extension)."""
    problems = []
    for ext in (S.AUDIO_EXT, S.JSON_EXT):
        if ext not in members:
            problems.append(f"sample {key!r} has no .{ext} member")
    if S.JSON_EXT not in members:
        return problems
    try:
        obj = json.loads(members[S.JSON_EXT].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        return problems + [f"sample {key!r}: JSON does not parse: {e}"]
    bad = S.validate_sample_json(obj)
    problems += [f"sample {key!r}: {p}" for p in bad]
    if bad:
        return problems
    if obj[S.CLIP_ID] != key:
        problems.append(f"sample {key!r}: JSON {S.CLIP_ID!r} is {obj[S.CLIP_ID]!r}")
    if stats_id is not None and obj[S.STATS_ID] != stats_id:
        problems.append(f"sample {key!r}: {S.STATS_ID!r} is {obj[S.STATS_ID]!r}, the folder's stats id is {stats_id!r}")
    if S.AUDIO_EXT in members:
        problems += check_audio(key, members[S.AUDIO_EXT], obj[S.SAMPLE_RATE], obj[S.SECONDS_TOTAL])
    return problems


def check_audio(key: str, data: bytes, sample_rate: int, seconds_total: float) -> list[str]:
    """Decode the audio fully; check rate, length and finiteness against the JSON."""
    import soundfile as sf

    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        return [f"sample {key!r}: audio does not decode: {e}"]
    problems = []
    expected = round(seconds_total * sample_rate)
    if rate != sample_rate:
        problems.append(f"sample {key!r}: audio is {rate} Hz, JSON says {sample_rate} Hz")
    if len(audio) != expected:
        problems.append(f"sample {key!r}: audio has {len(audio)} frames, JSON declares {expected} ({seconds_total} s at {sample_rate} Hz)")
    if audio.size and not np.isfinite(audio).all():
        problems.append(f"sample {key!r}: audio has non-finite samples")
    return problems


def check_arrays(key: str, members: dict[str, bytes], pre_encoded: bool) -> tuple[list[str], dict[str, tuple[tuple[int, ...], str]]]:
    """Problems with a sample's pre-encoded members (both required when `pre_encoded`), and the
    shape and dtype of each that loads."""
    problems, found = [], {}
    for ext, ndim in ARRAY_DIMS.items():
        if ext not in members:
            if pre_encoded:
                problems.append(f"sample {key!r} has no .{ext} member")
            continue
        try:
            arr = np.load(io.BytesIO(members[ext]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            problems.append(f"sample {key!r}: .{ext} does not load as a .npy array: {e}")
            continue
        if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
            problems.append(f"sample {key!r}: .{ext} holds {getattr(arr, 'dtype', type(arr).__name__)}, not a float array")
            continue
        if arr.ndim != ndim or 0 in arr.shape:
            problems.append(f"sample {key!r}: .{ext} has shape {arr.shape}, expected {ndim} non-empty dimensions")
            continue
        if not np.isfinite(arr).all():
            problems.append(f"sample {key!r}: .{ext} has non-finite values")
        found[ext] = (tuple(arr.shape), str(arr.dtype))
    return problems, found


def check_shard(path: str | Path, stats_id: str | None = None, pre_encoded: bool = False) -> ShardCheck:
    """Read one shard end to end, in memory; collect its complete sample keys and problems
    (and, in a pre-encoded folder, check every sample's latent and text states)."""
    path = fs.location(path)
    res = ShardCheck(path.name)
    res.sha256 = fs.sha256_file(path)
    seen: set[str] = set()
    key, members = None, {}

    def close_sample():
        if key is None:
            return
        res.problems.extend(f"{path.name}: {p}" for p in check_sample(key, members, stats_id))
        if pre_encoded or any(ext in members for ext in ARRAY_DIMS):
            problems, res.arrays[key] = check_arrays(key, members, pre_encoded)
            res.problems.extend(f"{path.name}: {p}" for p in problems)
        if S.AUDIO_EXT in members and S.JSON_EXT in members:
            res.keys.append(key)

    try:
        with path.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for m in tar:
                name = m.name
                if "/" in name or "\\" in name or ".." in name:
                    res.problems.append(f"{path.name}: refused member name {name!r} (contains '/' or '..')")
                    continue
                if not m.isfile():
                    res.problems.append(f"{path.name}: member {name!r} is not a regular file")
                    continue
                mkey, _, ext = name.partition(".")
                if not S.KEY_RE.match(mkey) or ext not in SAMPLE_EXTS:
                    res.problems.append(f"{path.name}: member {name!r} is not <key>.{{{','.join(SAMPLE_EXTS)}}} with a key matching {S.KEY_RE.pattern}")
                    continue
                data = tar.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {name!r} holds {len(data)} of {m.size} bytes")
                if mkey != key:
                    close_sample()
                    if mkey in seen:
                        res.problems.append(f"{path.name}: sample {mkey!r} appears twice or its members are not adjacent")
                    seen.add(mkey)
                    key, members = mkey, {}
                if ext in members:
                    res.problems.append(f"{path.name}: sample {mkey!r} has two .{ext} members")
                members[ext] = data
            close_sample()
            end = tar.offset
        res.problems += [f"{path.name}: {p}" for p in check_archive_end(path, end)]
    except (tarfile.TarError, EOFError, OSError) as e:
        res.problems.append(f"{path.name}: truncated or corrupt tar: {e} (after {len(res.keys)} complete sample(s))")
    return res


def check_archive_end(path: Path, end: int) -> list[str]:
    """After the last member, a tar holds only zero blocks (at least two): anything else means
    it was cut short, or a member header is corrupt (tarfile stops reading there silently)."""
    size = fs.size_and_mtime(path)[0]
    if size < end + 2 * tarfile.BLOCKSIZE:
        return [f"truncated: {size} bytes, the end-of-archive blocks after byte {end} are missing"]
    with fs.location(path).open("rb") as f:
        f.seek(end)
        while chunk := f.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return [f"corrupt: non-zero data after the last readable member (byte {end}), a header does not parse"]
    return []


def _read_json(path: Path, problems: list[str]):
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        problems.append(f"{path.name} does not parse: {e}")
        return None


def _read_checksums(path: Path, problems: list[str]) -> dict[str, str]:
    if not path.is_file():
        problems.append(f"{path.name} is missing")
        return {}
    sums = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            problems.append(f"{path.name} line {i} is not '<sha256>  <file>': {line!r}")
            continue
        sums[name] = digest
    return sums


def main(cfg: VerifyConfig, input_dir: str | Path | None = None, output_dir: str | Path | None = None) -> VerifyResult:
    """Verify every shard in `cfg.shards_dir` against sizes.json, index.parquet and SHA256SUMS
    (and encode_info.json in a folder `mosaiq encode` wrote).

    As a curate stage (`input_dir` given: the shards folder; verify writes nothing, so
    `output_dir` is not used) it verifies `input_dir` and raises VerifyError on any problem.
    """
    if input_dir is None:
        result = verify_folder(cfg.shards_dir)
    else:
        result = verify_folder(input_dir)
        if result.problems:
            raise VerifyError(f"verify found {len(result.problems)} problem(s) in {str(input_dir)!r}: {result.problems[:5]}")
    return result


def verify_folder(shards_dir: str | Path) -> VerifyResult:
    """Verify one shards folder (see the module docstring)."""
    t0 = time.perf_counter()
    folder = fs.location(shards_dir) if str(shards_dir) else Path("")
    if not str(shards_dir) or not folder.is_dir():
        raise FileNotFoundError(f"shards folder {str(shards_dir)!r} does not exist")
    problems: list[str] = []
    sizes = _read_json(folder / S.SIZES_FILE, problems)
    if sizes is not None and not (isinstance(sizes, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in sizes.values())):
        problems.append(f"{S.SIZES_FILE} is not an object of shard -> integer count: {str(sizes)[:200]}")
        sizes = None
    sums = _read_checksums(folder / S.CHECKSUMS_FILE, problems)
    stats_id = None
    if (folder / Q.STATS_FILE).is_file():
        try:
            stats_id = Q.load(folder / Q.STATS_FILE).id
        except Q.StatsError as e:
            problems.append(f"{Q.STATS_FILE}: {e}")
    index = None
    if (folder / S.INDEX_FILE).is_file():
        try:
            index = fs.read_table(folder / S.INDEX_FILE)
            T.require_columns(index, S.INDEX_SCHEMA.names, "verify")
        except (OSError, ValueError) as e:
            problems.append(f"{S.INDEX_FILE} cannot be read: {e}")
            index = None
    else:
        problems.append(f"{S.INDEX_FILE} is missing")
    problems += [f"temporary file {p.name} of an interrupted run is left" for p in sorted(folder.glob(f".*{fs.TMP_MARK}*"))]
    pre_encoded = (folder / S.ENCODE_INFO_FILE).is_file()
    if pre_encoded:
        info = _read_json(folder / S.ENCODE_INFO_FILE, problems)
        if info is not None and (not isinstance(info, dict) or info.get(S.ENCODE_COMPLETE) is not True):
            problems.append(f"{S.ENCODE_INFO_FILE}: the encode run did not finish ({S.ENCODE_COMPLETE!r} is "
                            f"{info.get(S.ENCODE_COMPLETE) if isinstance(info, dict) else info!r}); run `mosaiq encode` again")

    on_disk = sorted(p.name for p in folder.glob(f"*{S.SHARD_EXT}") if p.is_file())
    declared = sorted(sizes) if sizes is not None else on_disk
    problems += [f"{name} is in {S.SIZES_FILE} but missing" for name in declared if name not in on_disk]
    problems += [f"{name} is not in {S.SIZES_FILE}" for name in on_disk if sizes is not None and name not in sizes]
    found: dict[str, tuple[str, int]] = {}  # clip -> (shard, position)
    arrays: dict[str, list[tuple[str, str, tuple, str]]] = {ext: [] for ext in ARRAY_DIMS}  # (shard, key, shape, dtype)
    samples = 0
    for name in on_disk:
        res = check_shard(folder / name, stats_id, pre_encoded)
        problems += res.problems
        for key, found_arrays in res.arrays.items():
            for ext, (shape, dtype) in found_arrays.items():
                arrays[ext].append((name, key, shape, dtype))
        samples += len(res.keys)
        if sizes is not None and name in sizes and sizes[name] != len(res.keys):
            problems.append(f"{name}: {len(res.keys)} complete sample(s), {S.SIZES_FILE} says {sizes[name]}")
        if name not in sums:
            problems.append(f"{name} has no line in {S.CHECKSUMS_FILE}")
        elif sums[name] != res.sha256:
            problems.append(f"{name}: sha256 {res.sha256} differs from {S.CHECKSUMS_FILE} ({sums[name]})")
        for pos, key in enumerate(res.keys):
            if key in found:
                problems.append(f"{name}: sample {key!r} is also in {found[key][0]}")
            found[key] = (name, pos)
    problems += [f"{name} is in {S.CHECKSUMS_FILE} but missing" for name in sorted(sums) if name not in on_disk]
    if index is not None:
        problems += _check_index(index, found)
    problems += _check_same_shape(arrays[S.LATENT_EXT], S.LATENT_EXT, "shape", lambda shape: shape)
    problems += _check_same_shape(arrays[S.TEXT_EXT], S.TEXT_EXT, "width", lambda shape: shape[-1])
    log.info("verify: %d shard(s), %d sample(s), %d problem(s)", len(on_disk), samples, len(problems))
    verdict = "ok" if not problems else f"{len(problems)} problem(s)"
    return VerifyResult("verify", len(on_disk), 0, 0, time.perf_counter() - t0, {},
                        detail=f"{samples} sample(s) in {len(on_disk)} shard(s): {verdict}",
                        shards=len(on_disk), samples=samples, problems=problems)


def _check_index(index, found: dict[str, tuple[str, int]]) -> list[str]:
    problems = []
    rows = zip(*(index.column(c).to_pylist() for c in (T.CLIP_ID, S.SHARD, S.POSITION)))
    listed = {}
    for clip, shard, pos in rows:
        if clip in listed:
            problems.append(f"{S.INDEX_FILE}: clip {clip!r} is listed twice")
        listed[clip] = (shard, pos)
    for clip, where in sorted(listed.items()):
        if clip not in found:
            problems.append(f"{S.INDEX_FILE}: clip {clip!r} ({where[0]}) is in no shard")
        elif found[clip] != where:
            problems.append(f"{S.INDEX_FILE}: clip {clip!r} is at {where}, found at {found[clip]}")
    problems += [f"{S.INDEX_FILE}: clip {clip!r} in {found[clip][0]} is not listed" for clip in sorted(set(found) - set(listed))]
    return problems


def _check_same_shape(arrays: list[tuple[str, str, tuple, str]], ext: str, what: str, measure) -> list[str]:
    """Every sample's `ext` array against the folder's most common (measure(shape), dtype):
    a latent's whole shape, text states' width (their length follows the prompt)."""
    counts = Counter((measure(shape), dtype) for _, _, shape, dtype in arrays)
    if len(counts) < 2:
        return []
    (want, want_dtype), n = counts.most_common(1)[0]
    return [f"{shard}: sample {key!r}: .{ext} has shape {shape} {dtype}; the folder's "
            f"other samples have {what} {want} {want_dtype} ({n} of {len(arrays)})"
            for shard, key, shape, dtype in arrays if (measure(shape), dtype) != (want, want_dtype)]


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mosaiq verify",
                                description="re-read shards and check counts, keys, audio and JSON (and, in a folder "
                                            "`mosaiq encode` wrote, every latent and text-state member)")
    p.add_argument("shards_dir", help="folder written by `mosaiq export` or `mosaiq encode`")
    p.add_argument("--max-problems-shown", type=int, default=None)
    args = p.parse_args(argv)
    try:
        cfg = jobconfig.load(VerifyConfig, None, shards_dir=args.shards_dir, max_problems_shown=args.max_problems_shown)
        result = main(cfg)
    except (jobconfig.ConfigError, FileNotFoundError) as e:
        print(f"mosaiq verify: error: {e}", file=sys.stderr)
        return 2
    if result.ok:
        print(f"OK: {result.shards} shard(s), {result.samples} sample(s) verified in {cfg.shards_dir}")
        return 0
    print(f"FAILED: {len(result.problems)} problem(s) in {cfg.shards_dir} ({result.shards} shard(s), {result.samples} complete sample(s)):")
    for line in result.problems[: cfg.max_problems_shown]:
        print(f"  - {line}")
    if len(result.problems) > cfg.max_problems_shown:
        print(f"  ... and {len(result.problems) - cfg.max_problems_shown} more")
    return 1

