"""Export: caption table -> WebDataset tar shards (stable-audio-tools layout), index, report, card.

`mosaiq export --input CAPTIONS --output SHARDS_DIR` writes into SHARDS_DIR:

- `shard-NNNNNN.tar`: samples `<key>.flac` + `<key>.json`, key = clip_id (no dots, no `/`);
- `sizes.json` (shard -> sample count), `index.parquet` (clip -> shard, position),
  `SHA256SUMS` (`sha256sum -c` format), `export_report.json` (rows left out and why),
  the quality-stats JSON, `export_config.json` (the resolved config) and the dataset card.

How a run goes:
1. The driver reads the few columns it needs, keeps `ok` rows (the others go to the report),
   sorts them by clip_id (so the Parquet part layout does not matter), shuffles them with the
   seed and cuts them into shards by count and by an upper bound on bytes (uncompressed PCM).
2. One Ray task per shard decodes each clip, encodes FLAC, and writes the tar under a temporary
   name with fixed member metadata (mtime 0, uid/gid 0, mode 0644, plan order), then renames it
   and records the plan digest and sha256 in `.export_state/`. A shard whose record matches the
   plan and whose bytes match the record is skipped, so a killed run resumes.
3. The driver writes the index files, the report, the stats JSON, the config and the card.

The functions here know nothing of Ray; `run_shards_on_ray` is the only adapter.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import config as jobconfig
from pipeline.runner import StageReport, list_parts, write_table_atomic
from schemas import shard as S
from schemas import stats as Q
from schemas import tables as T

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1  # bump when shard bytes change for the same plan

# Files in the shards folder. TODO: move the index columns into schemas/ (index table).
SIZES_FILE = "sizes.json"
INDEX_FILE = "index.parquet"
CHECKSUMS_FILE = "SHA256SUMS"
REPORT_FILE = "export_report.json"
CONFIG_FILE = "export_config.json"
STATE_DIR = ".export_state"
PARTIAL_SUFFIX = ".partial"
FAILED_REASON = "export decode failed"  # reason of an ok row whose audio cannot be read any more
SHARD_EXT = ".tar"

SHARD = "shard"  # index.parquet: shard file name
POSITION = "position"  # index.parquet: sample index inside the shard
INDEX_SCHEMA = pa.schema(
    [pa.field(T.CLIP_ID, pa.string(), nullable=False), pa.field(SHARD, pa.string(), nullable=False),
     pa.field(POSITION, pa.int32(), nullable=False)],
    metadata={b"mosaiq.table": b"shard_index", b"mosaiq.version": b"1"},
)

# Member metadata that makes tar bytes depend on content only.
TAR_MTIME = 0
TAR_MODE = 0o644
TAR_END_BYTES = tarfile.RECORDSIZE  # end-of-archive blocks plus padding, at most
SAMPLE_OVERHEAD_BYTES = 4 * tarfile.BLOCKSIZE + 8192  # two headers, two paddings, FLAC headers
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,90}$")  # no dots, no `/`, fits a USTAR name with ext

# Columns export reads from the caption table.
INPUT_COLUMNS = [
    T.CLIP_ID, T.AUDIO_PATH, T.SOURCE_DIGEST, T.START_S, T.DURATION_S, T.SOURCE_SAMPLE_RATE,
    T.SOURCE_CHANNELS, T.CAPTION_ORIGINAL, T.STATUS, T.REASON, T.PMOS, T.QUALITY_LEVEL,
    T.QUALITY_PREFIX, T.STATS_ID, T.CLAP_ORIGINAL, T.CLAP_SCORE, T.CAPTION, T.CAPTION_SOURCE, T.PROMPT,
]

FLAC_BYTES_PER_SAMPLE = {"PCM_16": 2, "PCM_24": 3}


class ExportError(ValueError):
    """The input cannot be exported as it is (bad key, bad row, audio that no longer matches)."""


@dataclass(frozen=True)
class ExportConfig:
    """Export settings; the only defaults."""

    input: str  # caption table folder (part-*.parquet)
    output: str  # shards folder
    stats: str | None = None  # quality-stats JSON; None: find the one the rows' stats_id names (find_stats)
    seed: int = 0  # shuffle seed
    shard_max_count: int = 1000  # samples per shard at most
    shard_max_bytes: int = 1 << 30  # bound on a shard's size, counted as uncompressed PCM
    sample_rate: int | None = None  # None keeps each clip's source rate; else resample to this
    mono: bool = False  # False keeps the source channels (the trainer downmixes itself)
    flac_subtype: Literal["PCM_16", "PCM_24"] = "PCM_16"
    shard_prefix: str = "shard"
    num_cpus_per_shard: float = 1.0  # Ray resources of one shard-writing task
    card_examples: int = 12  # refined-caption examples in the dataset card
    address: str | None = None  # Ray cluster to join (None: RAY_ADDRESS, else embedded)
    num_cpus: int | None = None  # CPUs of an embedded Ray

    def __post_init__(self):
        if not self.input or not self.output:
            raise ValueError(f"input and output are required, got input={self.input!r} output={self.output!r}")
        if self.shard_max_count < 1:
            raise ValueError(f"shard_max_count must be >= 1, got {self.shard_max_count}")
        if self.shard_max_bytes < 1:
            raise ValueError(f"shard_max_bytes must be >= 1, got {self.shard_max_bytes}")
        if self.sample_rate is not None and self.sample_rate < 1:
            raise ValueError(f"sample_rate must be >= 1 or null, got {self.sample_rate}")
        if not KEY_RE.match(self.shard_prefix):
            raise ValueError(f"shard_prefix must match {KEY_RE.pattern}, got {self.shard_prefix!r}")
        if self.num_cpus_per_shard <= 0:
            raise ValueError(f"num_cpus_per_shard must be > 0, got {self.num_cpus_per_shard}")


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


# --- planning (driver) ------------------------------------------------------------------


def check_key(key) -> str:
    """A sample key, or ExportError: no dots, no `/`, no `..`, only [A-Za-z0-9_-], at most 90."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ExportError(f"refusing sample key {key!r}: keys must match {KEY_RE.pattern} (no dots, no '/', no '..')")
    return key


def read_captions(folder: str | Path) -> pa.Table:
    """The columns export needs from every part of a caption table folder."""
    parts = list_parts(folder)
    tables = []
    for p in parts:
        schema = pq.read_schema(p)
        T.require_columns(schema, INPUT_COLUMNS, f"export ({p.name})")
        tables.append(pq.read_table(p, columns=INPUT_COLUMNS))
    return pa.concat_tables(tables)


def split_rows(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(ok rows, every other row), both sorted by clip_id; raises on bad or duplicate keys."""
    T.require_columns(table, INPUT_COLUMNS, "export")
    ids = table.column(T.CLIP_ID).to_pylist()
    bad = [k for k in ids if not isinstance(k, str) or not KEY_RE.match(k)]
    if bad:
        raise ExportError(f"refusing {len(bad)} sample key(s), e.g. {bad[:3]!r}: keys must match {KEY_RE.pattern}")
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for k in ids:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise ExportError(f"duplicate clip_id(s) in the input, e.g. {dup[:3]!r}")
    unknown = sorted(set(table.column(T.STATUS).to_pylist()) - set(T.STATUSES))
    if unknown:
        raise ExportError(f"unknown status value(s) {unknown!r}; expected one of {T.STATUSES}")
    table = table.take(pc.sort_indices(table, [(T.CLIP_ID, "ascending")]))
    is_ok = pc.equal(table.column(T.STATUS), T.OK)
    return table.filter(is_ok), table.filter(pc.invert(is_ok))


def sample_json(row: dict, sample_rate: int) -> dict:
    """The shard sample JSON (schemas/shard.py) for one `ok` caption row."""
    obj = {
        S.PROMPT: row[T.PROMPT],
        S.CAPTION: row[T.CAPTION],
        S.CAPTION_ORIGINAL: row[T.CAPTION_ORIGINAL],
        S.QUALITY_LEVEL: row[T.QUALITY_LEVEL],
        S.QUALITY_PREFIX: row[T.QUALITY_PREFIX],
        S.PMOS: row[T.PMOS],
        S.CLAP_SCORE: row[T.CLAP_SCORE],
        S.SECONDS_START: row[T.START_S],
        S.SECONDS_TOTAL: row[T.DURATION_S],
        S.SAMPLE_RATE: sample_rate,
        S.CLIP_ID: row[T.CLIP_ID],
        S.SOURCE: row[T.AUDIO_PATH],
        S.STATS_ID: row[T.STATS_ID],
        S.VERSION: S.SHARD_SAMPLE_VERSION,
    }
    problems = S.validate_sample_json(obj)
    if not row[T.PROMPT]:
        problems.append(f"field {S.PROMPT!r} is empty")
    if problems:
        raise ExportError(f"ok row {row[T.CLIP_ID]!r} cannot be exported: {'; '.join(problems)}")
    return obj


def json_bytes(obj: dict) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except ValueError as e:  # NaN or Inf
        raise ExportError(f"sample {obj.get(S.CLIP_ID)!r} has a non-finite number: {obj}") from e


def shuffled(ok: pa.Table, seed: int) -> pa.Table:
    """Rows of `ok` (sorted by clip_id) in a seeded random order."""
    order = np.random.default_rng(seed).permutation(ok.num_rows)
    return ok.take(pa.array(order, pa.int64()))


def plan_shards(ok: pa.Table, cfg: ExportConfig) -> list[ShardSpec]:
    """Shuffle the ok rows and cut them into shards by count and by estimated bytes."""
    channels_out = 1 if cfg.mono else None
    shards: list[ShardSpec] = []
    current: list[SampleSpec] = []
    current_bytes = TAR_END_BYTES

    def close():
        nonlocal current, current_bytes
        name = f"{cfg.shard_prefix}-{len(shards):06d}{SHARD_EXT}"
        shards.append(ShardSpec(name, tuple(current), current_bytes, cfg.sample_rate, cfg.mono, cfg.flac_subtype))
        current, current_bytes = [], TAR_END_BYTES

    for row in shuffled(ok, cfg.seed).to_pylist():
        key = check_key(row[T.CLIP_ID])
        src_rate, channels = row[T.SOURCE_SAMPLE_RATE], row[T.SOURCE_CHANNELS]
        if not src_rate or not channels or src_rate < 1 or channels < 1:
            raise ExportError(f"ok row {key!r} has source_sample_rate={src_rate!r} source_channels={channels!r}")
        out_rate = cfg.sample_rate or src_rate
        start, duration = row[T.START_S], row[T.DURATION_S]
        if not (np.isfinite(start) and np.isfinite(duration)) or start < 0 or duration <= 0:
            raise ExportError(f"ok row {key!r} has start_s={start!r} duration_s={duration!r}")
        body = json_bytes(sample_json(row, out_rate))
        out_frames = round(duration * out_rate)
        est = out_frames * (channels_out or channels) * FLAC_BYTES_PER_SAMPLE[cfg.flac_subtype] + len(body) + SAMPLE_OVERHEAD_BYTES
        if current and (len(current) >= cfg.shard_max_count or current_bytes + est > cfg.shard_max_bytes):
            close()
        current.append(SampleSpec(key, row[T.AUDIO_PATH], row[T.SOURCE_DIGEST], src_rate,
                                  round(start * src_rate), round(duration * src_rate), out_frames, body))
        current_bytes += est
    if current:
        close()
    return shards


def mark_failed(table: pa.Table, failed: dict[str, str]) -> pa.Table:
    """`table` with the rows whose audio could not be exported turned into `error` rows."""
    ids = table.column(T.CLIP_ID).to_pylist()
    status = [T.ERROR if cid in failed else s for cid, s in zip(ids, table.column(T.STATUS).to_pylist())]
    reason = [failed.get(cid, r) for cid, r in zip(ids, table.column(T.REASON).to_pylist())]
    table = table.set_column(table.schema.get_field_index(T.STATUS), T.STATUS, pa.array(status, pa.string()))
    return table.set_column(table.schema.get_field_index(T.REASON), T.REASON, pa.array(reason, pa.string()))


def left_out_report(rest: pa.Table) -> dict:
    """Counts per status and reason, and every row left out of the shards (sorted by clip_id)."""
    counts: dict[str, dict[str, int]] = {}
    rows = []
    for clip_id, status, reason in zip(*(rest.column(c).to_pylist() for c in (T.CLIP_ID, T.STATUS, T.REASON))):
        counts.setdefault(status, {}).setdefault(reason, 0)
        counts[status][reason] += 1
        rows.append({T.CLIP_ID: clip_id, T.STATUS: status, T.REASON: reason})
    return {"counts": counts, "rows": rows}


# --- writing one shard (runs in a Ray task) -----------------------------------------------


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


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """Member metadata that depends on name and size only."""
    if "/" in name or ".." in name or name.startswith("."):
        raise ExportError(f"refusing tar member name {name!r}")
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_path(out_dir: Path, shard_name: str) -> Path:
    return out_dir / STATE_DIR / f"{shard_name}.json"


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def completed(spec: ShardSpec, out_dir: Path) -> ShardResult | None:
    """The result of an earlier complete write of exactly this shard, or None."""
    path, marker = out_dir / spec.name, state_path(out_dir, spec.name)
    if not (path.is_file() and marker.is_file()):
        return None
    try:
        state = json.loads(marker.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if state.get("digest") != spec.digest() or state.get("bytes") != path.stat().st_size:
        return None
    if sha256_file(path) != state.get("sha256"):
        return None
    if state.get("failed"):  # some audio could not be read last time: try again (it may be back)
        return None
    return ShardResult(spec.name, len(spec.samples), state["bytes"], state["sha256"], skipped=True)


class _HashingWriter:
    """A write-only file that hashes what passes through (tarfile needs write and tell)."""

    def __init__(self, f):
        self.f, self.hash, self.pos = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.hash.update(b)
        self.pos += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.pos


def write_shard(spec: ShardSpec, out_dir: str) -> ShardResult:
    """Write one shard under a temporary name and rename it; skip it if already complete."""
    out = Path(out_dir)
    done = completed(spec, out)
    if done is not None:
        return done
    final = out / spec.name
    tmp = out / f".{spec.name}.{os.getpid()}{PARTIAL_SUFFIX}"
    failed: list[tuple[str, str]] = []
    with open(tmp, "wb") as raw:
        hashing = _HashingWriter(raw)
        with tarfile.open(fileobj=hashing, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in spec.samples:
                rate = spec.sample_rate or s.source_rate
                try:  # audio that changed or went away since ingest: this sample's error, not the run's
                    audio = load_clip(s, spec.sample_rate, spec.mono)
                except ExportError as e:
                    failed.append((s.key, f"{FAILED_REASON}: {e}"))
                    continue
                flac = encode_flac(audio, rate, spec.flac_subtype)
                tar.addfile(tar_member(f"{s.key}.{S.AUDIO_EXT}", len(flac)), io.BytesIO(flac))
                tar.addfile(tar_member(f"{s.key}.{S.JSON_EXT}", len(s.json_bytes)), io.BytesIO(s.json_bytes))
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, final)
    size = final.stat().st_size
    sha = hashing.hash.hexdigest()
    count = len(spec.samples) - len(failed)
    state = {"digest": spec.digest(), "bytes": size, "sha256": sha, "count": count, "failed": failed}
    _write_text_atomic(state_path(out, spec.name), json.dumps(state, sort_keys=True) + "\n")
    return ShardResult(spec.name, count, size, sha, skipped=False, failed=tuple(failed))


# --- Ray adapter ----------------------------------------------------------------------------


def run_shards_on_ray(plan: list[ShardSpec], out_dir: Path, num_cpus_per_shard: float) -> list[ShardResult]:
    """One Ray task per shard; results in plan order."""
    import ray

    task = ray.remote(num_cpus=num_cpus_per_shard, max_retries=2)(write_shard)
    refs = [task.remote(spec, str(out_dir)) for spec in plan]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[ShardResult | None] = [None] * len(refs)
    pending, done_n, t0 = list(refs), 0, time.perf_counter()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            results[index[ref]] = ray.get(ref)
            done_n += 1
        if done_n == len(refs) or done_n % max(1, len(refs) // 20) == 0:
            log.info("export: %d/%d shard(s) done (%.1fs)", done_n, len(refs), time.perf_counter() - t0)
    return results  # type: ignore[return-value]


# --- the run ----------------------------------------------------------------------------------


def find_stats(cfg: ExportConfig, ok: pa.Table) -> Path | None:
    """The quality-stats JSON: `cfg.stats`; else the first `quality_stats.json` inside the input
    folder, beside it, or in a sibling folder (where quantize writes it) whose id the rows carry."""
    if cfg.stats is not None:
        path = Path(cfg.stats)
        if not path.is_file():
            raise ExportError(f"stats file {cfg.stats!r} does not exist")
        return path
    inp = Path(cfg.input)
    wanted = set(ok.column(T.STATS_ID).to_pylist())
    candidates = [inp / Q.STATS_FILE, inp.parent / Q.STATS_FILE] + sorted(inp.parent.glob(f"*/{Q.STATS_FILE}"))
    seen = []
    for path in dict.fromkeys(p for p in candidates if p.is_file()):
        try:
            sid = Q.load(path).id
        except Q.StatsError as e:
            log.warning("export: ignoring %s: %s", path, e)
            continue
        if sid in wanted:
            log.info("export: quality stats %s from %s", sid, path)
            return path
        seen.append(f"{path} (id {sid})")
    if seen and wanted:
        raise ExportError(f"the ok rows carry stats id(s) {sorted(wanted)[:3]!r}; found only {seen}: pass --stats")
    return None


def load_stats(path: Path | None, ok: pa.Table) -> tuple[Q.QualityStats | None, bytes | None]:
    """(parsed stats, raw bytes); checks the stats and that every ok row used this stats id."""
    if path is None:
        log.warning("export: no %s found inside or beside the input; the card will have no band edges", Q.STATS_FILE)
        return None, None
    raw = path.read_bytes()
    try:
        stats = Q.loads(raw.decode("utf-8"))
    except (Q.StatsError, UnicodeDecodeError) as e:
        raise ExportError(f"stats file {str(path)!r}: {e}") from e
    used = sorted(set(ok.column(T.STATS_ID).to_pylist()) - {stats.id})
    if used:
        raise ExportError(f"ok rows carry stats id(s) {used[:3]!r} but {str(path)!r} has id {stats.id!r}")
    return stats, raw


def remove_partials(out: Path) -> None:
    """Remove temporary files of killed runs or of retried tasks."""
    for p in sorted(out.glob(f".*{PARTIAL_SUFFIX}")) + sorted((out / STATE_DIR).glob(f".*{PARTIAL_SUFFIX}")):
        log.info("export: removing the temporary file %s of an interrupted write", p)
        p.unlink(missing_ok=True)


def clean_output(out: Path, plan: list[ShardSpec], prefix: str) -> None:
    """Remove partial files of killed runs, and shards (with state) that the plan no longer has."""
    planned = {s.name for s in plan}
    remove_partials(out)
    for p in sorted(out.glob(f"{prefix}-*{SHARD_EXT}")):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}{re.escape(SHARD_EXT)}", p.name) and p.name not in planned:
            log.warning("export: removing %s, which the current plan does not have", p)
            p.unlink()
            state_path(out, p.name).unlink(missing_ok=True)


def write_index_files(out: Path, plan: list[ShardSpec], results: list[ShardResult]) -> None:
    sizes = {r.name: r.count for r in results}
    _write_text_atomic(out / SIZES_FILE, json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    _write_text_atomic(out / CHECKSUMS_FILE, "".join(f"{r.sha256}  {r.name}\n" for r in results))
    ids, shards, positions = [], [], []
    for spec, result in zip(plan, results):
        failed = {key for key, _ in result.failed}
        for i, key in enumerate(s.key for s in spec.samples if s.key not in failed):
            ids.append(key)
            shards.append(spec.name)
            positions.append(i)
    index = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array(shards, pa.string()),
                                  pa.array(positions, pa.int32())], schema=INDEX_SCHEMA)
    write_table_atomic(index, out / INDEX_FILE)


def main(cfg: ExportConfig) -> StageReport:
    """Export the caption table `cfg.input` to shards in `cfg.output` (see the module docstring)."""
    from pipeline import card
    from pipeline.raycluster import init_ray

    t0 = time.perf_counter()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    # 1. read and split the input; plan the shards
    table = read_captions(cfg.input)
    ok, rest = split_rows(table)
    stats, stats_raw = load_stats(find_stats(cfg, ok), ok)
    plan = plan_shards(ok, cfg)
    log.info("export: %d row(s), %d ok -> %d shard(s); %d left out", table.num_rows, ok.num_rows, len(plan), rest.num_rows)
    clean_output(out, plan, cfg.shard_prefix)
    # 2. write the shards, one Ray task each
    results: list[ShardResult] = []
    if plan:
        init_ray(cfg.address, cfg.num_cpus)
        results = run_shards_on_ray(plan, out, cfg.num_cpus_per_shard)
        remove_partials(out)  # a task retried after its worker died leaves one
    else:
        log.warning("export: no ok rows in %s: no shards written", cfg.input)
    # 3. index, report, stats, config, card
    write_index_files(out, plan, results)
    failed = {key: reason for r in results for key, reason in r.failed}
    if failed:
        for key, reason in sorted(failed.items()):
            log.warning("export: %s left out: %s", key, reason)
        table = mark_failed(table, failed)
        ok, rest = split_rows(table)
    report = {
        "input_rows": table.num_rows,
        "exported": ok.num_rows,
        "shards": len(plan),
        "shard_names": [spec.name for spec in plan],
        "bytes": sum(r.bytes for r in results),
        "stats_id": stats.id if stats else None,
        "left_out": left_out_report(rest),
    }
    _write_text_atomic(out / REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if stats_raw is not None:
        tmp = out / f".{Q.STATS_FILE}{PARTIAL_SUFFIX}"
        tmp.write_bytes(stats_raw)
        os.replace(tmp, out / Q.STATS_FILE)
    else:
        (out / Q.STATS_FILE).unlink(missing_ok=True)  # an earlier run's copy would not apply
    jobconfig.save_resolved(cfg, out / CONFIG_FILE)
    card.write_card(out, table, report, stats, cfg.card_examples)
    skipped = sum(r.skipped for r in results)
    status = dict(sorted(Counter(table.column(T.STATUS).to_pylist()).items()))
    stage = StageReport("export", len(plan), skipped, ok.num_rows, time.perf_counter() - t0, status)
    log.info("%s", stage.line())
    return stage


def build_parser() -> argparse.ArgumentParser:
    from pipeline.raycluster import add_ray_args

    p = argparse.ArgumentParser(prog="mosaiq export", description="caption table -> WebDataset shards, index and dataset card")
    p.add_argument("--config", default=None, help="job YAML; its `export` section is read")
    p.add_argument("--input", default=None, help="caption table folder (part-*.parquet)")
    p.add_argument("--output", default=None, help="shards folder")
    p.add_argument("--stats", default=None, help=f"quality-stats JSON (default: the {Q.STATS_FILE} inside, beside or next to --input whose id the rows carry)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--shard-max-count", type=int, default=None)
    p.add_argument("--shard-max-bytes", type=int, default=None)
    p.add_argument("--sample-rate", type=int, default=None, help="resample to this rate (default: keep the source rate)")
    p.add_argument("--mono", action="store_true", default=None, help="downmix to mono (default: keep channels)")
    add_ray_args(p)
    return p


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = jobconfig.load(ExportConfig, args.config, section="export", **overrides)
        report = main(cfg)
    except (jobconfig.ConfigError, ExportError, T.SchemaError, Q.StatsError, FileNotFoundError) as e:
        print(f"mosaiq export: error: {e}", file=sys.stderr)
        return 2
    print(report.line())
    print(f"shards in {cfg.output}; check them with: mosaiq verify {cfg.output}")
    return 0

