"""ingest: a folder of audio or a manifest (CSV, JSONL, Parquet) -> the clip table.

Each file is probed (header plus its last second; never decoded in full), split into clips of
`clip_seconds` by a policy (all clips, the first N, or N at seeded random offsets), and given a
deterministic `clip_id`. Files that cannot be used become one `error` or `rejected` row with
the reason, so every input file ends in at least one row and nothing is dropped silently.

It runs as Ray tasks (`pipeline.backend.run_tasks`), the driver holding only file names of its
own work files and counts, never the list of audio files:
1. list: one task lists the top of the folder, one task per subfolder walks it (or one task
   reads the manifest), writing the sources in batches of `files_per_task` to `_work/`;
2. probe: one task per batch probes and hashes its files (streamed) into clip rows;
3. duplicates: one task finds clips whose id an earlier row already has;
4. write: one task per output part gathers its rows, marks duplicates, and writes the part
   when its bytes changed.
Without Ray (not initialised: the pure tests) the same tasks run one after another in this process.

    mosaiq ingest --input MUSIC_DIR_OR_MANIFEST --output CLIPS [--config jobs/curate.yaml]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script (`python pipeline/ingest.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import config as jobcfg
from pipeline import audio, backend, fs
from pipeline.stage import StageReport
from schemas import tables as T

log = logging.getLogger(__name__)

CONFIG_FILE = "_ingest_config.json"  # "_": Parquet readers of the folder skip it

PATH_COLUMN = "path"  # manifest column with the audio file
CAPTION_COLUMN = "caption"
TAGS_COLUMN = "tags"
_TAG_SPLIT = re.compile(r"\s*[;,|]\s*")


@dataclass(frozen=True)
class IngestConfig:
    clip_seconds: float = T.CLIP_SECONDS
    min_seconds: float = 2.0  # shorter files are rejected; shorter last clips are dropped
    policy: Literal["all", "first", "random"] = "all"
    clips_per_file: int = 1  # for "first" and "random"
    seed: int = 0  # for "random" offsets
    max_sample_rate: int = 384_000  # above this a file is rejected
    min_sample_rate: int = 8_000  # below this a file is rejected (a 1 Hz file would give 1000s of clips)
    max_clips_per_file: int = 5_000  # a longer file is rejected (5000 x 10.24 s is 14 hours)
    roots: tuple[str, ...] = ()  # folders files must be in; () = the scanned folder or the manifest's folder
    allow_any_path: bool = False  # True: no confinement at all (a manifest may name any file)
    clip_id_from: Literal["content", "path"] = "content"  # content digest survives renames
    rows_per_part: int = 1000
    files_per_task: int = 256  # files listed, probed and hashed per Ray task

    def __post_init__(self):
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not 0 < self.min_seconds <= self.clip_seconds:
            raise ValueError(f"min_seconds must be in (0, clip_seconds={self.clip_seconds}], got {self.min_seconds}")
        if self.clips_per_file < 1:
            raise ValueError(f"clips_per_file must be >= 1, got {self.clips_per_file}")
        if not 1 <= self.min_sample_rate <= self.max_sample_rate:
            raise ValueError(f"need 1 <= min_sample_rate <= max_sample_rate, got {self.min_sample_rate}, {self.max_sample_rate}")
        if self.max_clips_per_file < 1:
            raise ValueError(f"max_clips_per_file must be >= 1, got {self.max_clips_per_file}")
        if self.rows_per_part < 1 or self.files_per_task < 1:
            raise ValueError(f"rows_per_part and files_per_task must be >= 1, got {self.rows_per_part}, {self.files_per_task}")


@dataclass(frozen=True)
class SourceRow:
    """One input file with what the input said about it."""

    path: str
    caption: str = ""
    tags: tuple[str, ...] = ()
    metadata_json: str = "{}"


# --- reading the input -------------------------------------------------------------------


def _clean_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _parse_tags(value) -> tuple[str, ...]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ()
    if isinstance(value, (list, tuple, np.ndarray)):
        items = [_clean_text(v) for v in value]
    else:
        items = _TAG_SPLIT.split(_clean_text(value))
    return tuple(t for t in items if t)


def read_manifest(path: str | Path) -> list[SourceRow]:
    """Rows of a CSV, JSONL or Parquet manifest; relative paths are relative to the manifest."""
    import pandas as pd

    path = fs.location(fs.absolute(path))
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json", ".parquet"):
        raise ValueError(f"manifest {str(path)!r}: unknown type {suffix!r}; expected .csv, .jsonl or .parquet")
    with path.open("rb") as f:
        if suffix == ".csv":
            text = _manifest_text(f.read(), path)
            df = pd.read_csv(io.StringIO(text), dtype=str)  # empty cells and NaN/NA/null read as missing, not as text
            header = str(df.columns[0]) if len(df.columns) == 1 else ""
            for sep in (";", "\t"):  # Excel's CSV where the decimal mark is a comma; its "Unicode text"
                if PATH_COLUMN in header.split(sep):
                    df = pd.read_csv(io.StringIO(text), dtype=str, sep=sep)
                    break
        elif suffix == ".parquet":
            df = pd.read_parquet(f)
        else:
            df = pd.DataFrame(_json_lines(f.read(), path))
    if PATH_COLUMN not in df.columns:
        raise ValueError(f"manifest {str(path)!r} has no {PATH_COLUMN!r} column; it has {list(df.columns)}")
    extra = [c for c in df.columns if c not in (PATH_COLUMN, CAPTION_COLUMN, TAGS_COLUMN)]
    rows = []
    for rec in df.to_dict(orient="records"):
        p = _clean_text(rec[PATH_COLUMN])
        if p and "://" not in p:  # relative to the manifest, stored absolute
            p = os.path.normpath(os.path.join(path.parent, p)) if not fs.is_remote(path) else _url_join(str(path.parent), p)
        meta = {c: _jsonable(rec[c]) for c in extra}
        rows.append(
            SourceRow(
                path=p,
                caption=_clean_text(rec.get(CAPTION_COLUMN)),
                tags=_parse_tags(rec.get(TAGS_COLUMN)),
                metadata_json=json.dumps(meta, sort_keys=True, ensure_ascii=False),
            )
        )
    return rows


def _json_lines(raw: bytes, path) -> list[dict]:
    """The objects of a JSON-lines manifest, one a line (blank lines skipped); a line that is not
    a JSON object is refused with its number."""
    rows = []
    for i, line in enumerate(_manifest_text(raw, path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {str(path)!r}, line {i}: not JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"manifest {str(path)!r}, line {i}: a JSON {type(obj).__name__}, not an object with a 'path'")
        rows.append(obj)
    return rows


def _manifest_text(raw: bytes, path) -> str:
    """A CSV or JSON-lines manifest's text: UTF-8 (with or without the BOM Excel writes), or UTF-16
    with its BOM; a legacy encoding cannot be told from another, so it is refused with where it fails."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"manifest {str(path)!r} is not UTF-8 text: byte 0x{raw[e.start]:02x} on line {line} (saved in a "
                         f"legacy encoding such as Windows-1252?): save it as UTF-8 (Excel: 'CSV UTF-8')") from None


def _jsonable(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _url_join(base: str, rel: str) -> str:
    """`rel` (a manifest's relative path, `/`-separated) under the URL `base`, `..` resolved."""
    scheme, rest = base.split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, rel))}"


@dataclass(frozen=True)
class _Entry:
    """One entry of a folder, on disk or in object storage: its name, full path or URL, and
    whether ingest walks into it (`dir`) or may list it (`file`: a file or a symlink, even one
    that cannot be followed: a loop or a dangling link ends as an `error` row, not vanishing)."""

    name: str
    path: str
    kind: str  # "dir", "file" or "other"


def _local_kind(entry: os.DirEntry) -> str:
    try:
        if entry.is_dir(follow_symlinks=False):  # symlinked folders are not followed
            return "dir"
        return "file" if entry.is_symlink() or entry.is_file() else "other"
    except OSError:
        return "other"


def _entries(folder: str) -> list[_Entry]:
    """A folder's entries sorted by name; an unreadable folder lists nothing (as `Path.rglob`)."""
    try:
        if fs.is_remote(folder):
            fsys, root = fs.filesystem(folder)
            scheme = fs.protocol(folder)
            found = [_Entry(posixpath.basename(e["name"].rstrip("/")), f"{scheme}://{e['name'].rstrip('/')}",
                            "dir" if e.get("type") == "directory" else "file")
                     for e in fsys.ls(root, detail=True)]
            found = [e for e in found if e.path.rstrip("/") != f"{scheme}://{root.rstrip('/')}"]  # some stores list the folder
        else:
            with os.scandir(folder) as it:
                found = [_Entry(e.name, e.path, _local_kind(e)) for e in it]
    except OSError as e:
        log.warning("ingest: cannot list %s: %s", folder, e)
        return []
    return sorted(found, key=lambda e: e.name)


def _listed(entry: _Entry) -> bool:
    """An entry ingest lists: an audio extension, and a file (see `_Entry`)."""
    return entry.kind == "file" and os.path.splitext(entry.name)[1].lower() in audio.AUDIO_EXTENSIONS


def _is_folder(entry: _Entry) -> bool:
    return entry.kind == "dir"


def walk_files(folder: str | Path):
    """Every listed file under `folder`, in the order of `sorted(Path.rglob(...))` (by path
    components): each folder's entries by name, a subfolder's files where its name sorts."""
    for entry in _entries(str(folder)):
        if _is_folder(entry):
            yield from walk_files(entry.path)
        elif _listed(entry):
            yield entry.path


def scan_folder(folder: str | Path) -> list[SourceRow]:
    """Every file under `folder` with an audio extension, sorted by path, stored absolute."""
    return [SourceRow(path=p) for p in walk_files(fs.absolute(folder))]


def read_input(path: str | Path) -> tuple[list[SourceRow], Path]:
    """Rows from a folder or a manifest, and the folder that is the default root."""
    path = fs.location(fs.absolute(path))
    if path.is_dir():
        return scan_folder(path), path
    if path.is_file():
        return read_manifest(path), path.parent
    raise FileNotFoundError(f"input {str(path)!r} is neither a folder nor a manifest file")


# --- listing in tasks: sources in batch files, so the driver never holds the list ----------

_LIST_SCHEMA = pa.schema([
    pa.field(PATH_COLUMN, pa.string()),
    pa.field(CAPTION_COLUMN, pa.string()),
    pa.field(TAGS_COLUMN, pa.list_(pa.string())),
    pa.field("metadata_json", pa.string()),
])


def _write_batches(sources, work: str, prefix: str, per_batch: int) -> list[tuple[str, int]]:
    """Write `sources` (SourceRows or paths, in order) as listing files of `per_batch` rows;
    returns [(file, rows)]."""
    out, batch = [], []

    def flush():
        if batch:
            path = fs.join(work, f"{prefix}-{len(out):06d}.parquet")
            rows = [SourceRow(path=b) if isinstance(b, str) else b for b in batch]
            table = pa.table([[r.path for r in rows], [r.caption for r in rows], [list(r.tags) for r in rows],
                              [r.metadata_json for r in rows]], schema=_LIST_SCHEMA)
            fs.atomic_write_table(table, path)
            out.append((path, len(batch)))
            batch.clear()

    for src in sources:
        batch.append(src)
        if len(batch) >= per_batch:
            flush()
    flush()
    return out


def _list_top(folder: str, work: str, per_batch: int) -> list[tuple]:
    """The top of a scanned folder, in order: ("dir", path) for each subfolder (walked by its own
    task), ("files", listing file, count) for each batch of the files between them."""
    items: list[tuple] = []
    run: list[str] = []
    seq = 0

    def flush():
        nonlocal seq
        for path, n in _write_batches(run, work, f"list-top{seq:05d}", per_batch):
            items.append(("files", path, n))
        seq += 1
        run.clear()

    for entry in _entries(folder):
        if _is_folder(entry):
            flush()
            items.append(("dir", entry.path))
        elif _listed(entry):
            run.append(entry.path)
    flush()
    return items


def _list_tree(folder: str, work: str, prefix: str, per_batch: int) -> list[tuple[str, int]]:
    """Every listed file under a subfolder, in order, as listing files."""
    return _write_batches(walk_files(folder), work, prefix, per_batch)


def _list_manifest(path: str, work: str, per_batch: int) -> list[tuple[str, int]]:
    return _write_batches(read_manifest(path), work, "list-manifest", per_batch)


def _read_listing(path: str) -> list[SourceRow]:
    t = fs.read_table(path)
    return [SourceRow(path=r[PATH_COLUMN], caption=r[CAPTION_COLUMN], tags=tuple(r[TAGS_COLUMN]),
                      metadata_json=r["metadata_json"]) for r in t.to_pylist()]


# --- clips -------------------------------------------------------------------------------


def clip_id(key: str, start_s: float, duration_s: float) -> str:
    return hashlib.blake2b(f"{key}|{start_s:.3f}|{duration_s:.3f}".encode(), digest_size=8).hexdigest()


def clip_spans(duration_s: float, key: str, cfg: IngestConfig) -> list[tuple[float, float]]:
    """(start_s, duration_s) of each clip of a file of `duration_s` under the policy."""
    clip = cfg.clip_seconds
    if duration_s <= clip:
        return [(0.0, round(duration_s, 6))]
    if cfg.policy == "random":
        # seeded per file (not per run order), so a file gets the same clips in any input
        rng = np.random.default_rng(fs.derive_seed(f"{cfg.seed}|{key}"))
        starts = sorted(rng.uniform(0.0, duration_s - clip, size=cfg.clips_per_file))
        return [(round(float(s), 3), clip) for s in starts]
    spans = []
    start = 0.0
    while start + cfg.min_seconds <= duration_s + 1e-9:
        spans.append((round(start, 6), round(min(clip, duration_s - start), 6)))
        start += clip
        if cfg.policy == "first" and len(spans) >= cfg.clips_per_file:
            break
    return spans


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def inside_roots(path: str, roots: list[Path]) -> bool:
    """Whether `path` is inside one of `roots` (absolute folders) both as written and after
    following symlinks. Decided from the path alone, the same way whether or not the file exists.
    A URL is inside a root URL it starts with (object stores have no links or `..`)."""
    if fs.is_remote(path) or any(fs.is_remote(r) for r in roots):
        url = fs.absolute(path) if fs.is_remote(path) else None
        return url is not None and any(url.startswith(str(r).rstrip("/") + "/") for r in roots if fs.is_remote(r))
    lexical = Path(os.path.normpath(os.path.abspath(path)))
    if not any(_under(lexical, r) or _under(lexical, Path(os.path.realpath(r))) for r in roots):
        return False
    real = Path(os.path.realpath(lexical))  # a loop stays unresolved: the probe reports it
    return any(_under(real, Path(os.path.realpath(r))) for r in roots)


def _row(src: SourceRow, **fields) -> dict:
    base = {
        T.AUDIO_PATH: src.path,
        T.SOURCE_DIGEST: "",
        T.START_S: 0.0,
        T.DURATION_S: 0.0,
        T.SOURCE_DURATION_S: None,
        T.SOURCE_SAMPLE_RATE: None,
        T.SOURCE_CHANNELS: None,
        T.SOURCE_FORMAT: None,
        T.SOURCE_SIZE_BYTES: None,
        T.SOURCE_MTIME_NS: None,
        T.CAPTION_ORIGINAL: src.caption,
        T.TAGS: list(src.tags),
        T.METADATA_JSON: src.metadata_json,
        T.STATUS: T.OK,
        T.REASON: "",
    }
    base.update(fields)
    if T.CLIP_ID not in base:
        base[T.CLIP_ID] = clip_id("path:" + src.path, base[T.START_S], base[T.DURATION_S])
    return base


def ingest_file(src: SourceRow, cfg: IngestConfig, roots: list[Path]) -> list[dict]:
    """The clip rows of one file (one `error`/`rejected` row when it cannot be used)."""
    if not src.path:
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: "empty path in the manifest"})]
    if roots and not inside_roots(src.path, roots):
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: f"{T.OUTSIDE_ROOTS} {[str(r) for r in roots]}"})]
    try:
        path = fs.location(src.path)
        before = fs.size_and_mtime(path)
        info = audio.probe(path)
        digest = fs.file_digest(path)
        after = fs.size_and_mtime(path)
    except audio.AudioError as e:
        return [_row(src, **{T.STATUS: e.status, T.REASON: e.reason})]
    except OSError as e:
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: f"unreadable: {e.strerror or e}"})]
    except ValueError as e:  # a URL no filesystem can open
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: f"unreadable: {e}"})]
    if before != after:
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: "the file changed while it was being ingested"})]
    meta = {
        T.SOURCE_DIGEST: digest,
        T.SOURCE_DURATION_S: info.duration_s,
        T.SOURCE_SAMPLE_RATE: info.sample_rate,
        T.SOURCE_CHANNELS: info.channels,
        T.SOURCE_FORMAT: info.format,
        T.SOURCE_SIZE_BYTES: after[0],
        T.SOURCE_MTIME_NS: after[1],
    }
    if info.sample_rate > cfg.max_sample_rate:
        reason = f"sample_rate_too_high: {info.sample_rate} Hz > max {cfg.max_sample_rate} Hz"
        return [_row(src, **meta, **{T.STATUS: T.REJECTED, T.REASON: reason})]
    if info.sample_rate < cfg.min_sample_rate:
        reason = f"sample_rate_too_low: {info.sample_rate} Hz < min {cfg.min_sample_rate} Hz"
        return [_row(src, **meta, **{T.STATUS: T.REJECTED, T.REASON: reason})]
    if info.duration_s < cfg.min_seconds:
        reason = f"too_short: {info.duration_s:.2f} s < min {cfg.min_seconds:.2f} s"
        return [_row(src, **meta, **{T.DURATION_S: info.duration_s, T.STATUS: T.REJECTED, T.REASON: reason})]
    key = digest if cfg.clip_id_from == "content" else "path:" + src.path
    spans = clip_spans(info.duration_s, key, cfg)
    if len(spans) > cfg.max_clips_per_file:
        reason = f"too_many_clips: {len(spans)} clips > max_clips_per_file {cfg.max_clips_per_file}"
        return [_row(src, **meta, **{T.DURATION_S: info.duration_s, T.STATUS: T.REJECTED, T.REASON: reason})]
    return [_row(src, **meta, **{T.START_S: s, T.DURATION_S: d, T.CLIP_ID: clip_id(key, s, d)}) for s, d in spans]


def _mark_duplicates(rows: list[dict]) -> None:
    """Later rows with an already-seen clip_id (same file content or same path twice) are rejected."""
    first: dict[str, str] = {}
    for r in rows:
        cid = r[T.CLIP_ID]
        if cid in first:
            _as_duplicate(r, first[cid], len(first))
        first.setdefault(r[T.CLIP_ID], r[T.AUDIO_PATH])


def _as_duplicate(row: dict, first_path: str, index: int) -> None:
    """Row number `index` (0-based, over the whole input) repeats the clip of `first_path`."""
    row[T.STATUS] = T.REJECTED
    row[T.REASON] = f"duplicate: same audio as {first_path}"
    row[T.CLIP_ID] = clip_id(f"dup:{row[T.AUDIO_PATH]}:{index}", row[T.START_S], row[T.DURATION_S])


def ingest_rows(sources: list[SourceRow], cfg: IngestConfig, roots: list[Path]) -> pa.Table:
    """The clip table for these sources, in input order, in this process (small inputs)."""
    rows = [r for s in sources for r in ingest_file(s, cfg, roots)]
    _mark_duplicates(rows)
    if not rows:
        return T.CLIPS_SCHEMA.empty_table()
    return pa.Table.from_pylist(rows, schema=T.CLIPS_SCHEMA)


# --- the tasks after listing ------------------------------------------------------------------

_INDEX = "index"  # a row's number over the whole input (the duplicates file)
_FIRST_PATH = "first_path"


def _probe_batch(listing: str, cfg: IngestConfig, roots: list[Path], out: str) -> int:
    """Probe and hash the files of one listing file into clip rows (one task); returns the rows."""
    rows = [r for src in _read_listing(listing) for r in ingest_file(src, cfg, roots)]
    fs.atomic_write_table(pa.Table.from_pylist(rows, schema=T.CLIPS_SCHEMA), out)
    return len(rows)


def _find_duplicates(row_files: list[str], out: str) -> int:
    """Rows whose clip_id an earlier row has (one task over the ids and paths of every row):
    writes (index, first_path) and returns how many there are. A row's duplicate id is derived
    from its index, which is the count of ids seen before it in `_mark_duplicates`."""
    cols = [T.CLIP_ID, T.AUDIO_PATH]
    tables = [fs.read_table(f, columns=cols) for f in row_files]
    ids = pa.concat_tables(tables).combine_chunks() if tables else pa.table({c: pa.array([], pa.string()) for c in cols})
    n = ids.num_rows
    indexed = ids.append_column(_INDEX, pa.array(np.arange(n, dtype=np.int64)))
    first = indexed.group_by(T.CLIP_ID, use_threads=False).aggregate([(_INDEX, "min")])
    joined = indexed.join(first, T.CLIP_ID, use_threads=False)
    dup = joined.filter(pc.not_equal(joined.column(_INDEX), joined.column(f"{_INDEX}_min")))
    dup = dup.sort_by(_INDEX)
    first_path = indexed.column(T.AUDIO_PATH).take(dup.column(f"{_INDEX}_min"))
    fs.atomic_write_table(pa.table({_INDEX: dup.column(_INDEX), _FIRST_PATH: first_path}), out)
    return dup.num_rows


def _write_part(slices: list[tuple[str, int, int]], start: int, dups_file: str, out: str) -> dict[str, int]:
    """One output part (one task): rows `start`.. of the input from `slices` (file, offset,
    length), duplicates marked; written only when its bytes change. Returns its status counts."""
    pieces = [fs.read_table(f).slice(off, n) for f, off, n in slices]
    table = pa.concat_tables(pieces).combine_chunks() if pieces else T.CLIPS_SCHEMA.empty_table()
    dups = fs.read_table(dups_file)
    index = dups.column(_INDEX)
    dups = dups.filter(pc.and_(pc.greater_equal(index, start), pc.less(index, start + table.num_rows)))
    if dups.num_rows:
        rows = table.to_pylist()
        for i, first_path in zip(dups.column(_INDEX).to_pylist(), dups.column(_FIRST_PATH).to_pylist()):
            _as_duplicate(rows[i - start], first_path, i)
        table = pa.Table.from_pylist(rows, schema=T.CLIPS_SCHEMA)
    table = T.conform(table, T.CLIPS_SCHEMA)  # Parquet reads list fields back as "element"; the schema says "item"
    fs.write_if_changed(out, fs.table_bytes(table))
    return status_counts(table)


def _part_slices(counts: list[tuple[str, int]], rows_per_part: int) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """(first row, [(file, offset, length)]) of each output part, from the rows per file."""
    total = sum(n for _, n in counts)
    parts = []
    files = iter(counts)
    current, used = None, 0
    for start in range(0, max(total, 1), rows_per_part):
        need, slices = min(rows_per_part, total - start), []
        while need > 0:
            if current is None or used == current[1]:
                current, used = next(files), 0
                continue
            take = min(need, current[1] - used)
            slices.append((current[0], used, take))
            used += take
            need -= take
        parts.append((start, slices))
    return parts


def resolve_roots(cfg: IngestConfig, default_root: Path) -> list[Path]:
    """The folders files must be in: the configured roots, else the scanned folder or the
    manifest's folder; none with `allow_any_path`."""
    if cfg.allow_any_path:
        return []
    return [fs.location(r if fs.is_remote(r) else os.path.normpath(fs.absolute(r))) for r in (cfg.roots or (str(default_root),))]


def main(cfg: IngestConfig, input_path: str | Path, output_dir: str | Path, progress: bool = True) -> StageReport:
    """Ingest a folder or manifest into `output_dir/part-NNNNN.parquet` (see the module docstring).

    Every file is probed again on each run (cheap: headers and last seconds); a part that comes
    out with the same bytes as before is left untouched, so the stages downstream skip it.
    Runs on Ray when it is initialised, else in this process.
    """
    t0 = time.perf_counter()
    source = _check_input(input_path)
    roots = resolve_roots(cfg, source if source.is_dir() else source.parent)
    local = not backend.ray_running()
    if local:
        log.info("ingest: Ray is not running: the tasks run in this process")
    with fs.stage_output("ingest", source, output_dir) as out:
        work = out / backend.WORK_DIR
        fs.rmtree(work)  # a killed run's: ingest recomputes everything
        if not fs.is_remote(work):
            work.mkdir(parents=True)
        run = dict(local=local, show=False)
        # 1. list: (listing file, files) in input order
        per = cfg.files_per_task
        if source.is_dir():
            top = backend.run_tasks(_list_top, [(str(source), str(work), per)], "ingest (list)", **run)[0]
            dirs = [item[1] for item in top if item[0] == "dir"]
            trees = iter(backend.run_tasks(_list_tree, [(d, str(work), f"list-d{i:06d}", per) for i, d in enumerate(dirs)],
                                           "ingest (list)", unit="folder", **run))
            listings = [entry for item in top for entry in ([item[1:]] if item[0] == "files" else next(trees))]
        else:
            listings = backend.run_tasks(_list_manifest, [(str(source), str(work), per)], "ingest (list)", **run)[0]
        n_files = sum(n for _, n in listings)
        log.info("ingest: %d file(s) from %s in %d task(s)", n_files, input_path, len(listings))
        # 2. probe and hash: rows per listing file
        row_files = [str(work / f"rows-{i:06d}.parquet") for i in range(len(listings))]
        calls = [(listing, cfg, roots, rows) for (listing, _), rows in zip(listings, row_files)]
        row_counts = backend.run_tasks(_probe_batch, calls, "ingest", unit="file", sizes=[n for _, n in listings],
                                       local=local, show=progress)
        # 3. duplicates over the whole input, 4. the parts
        dups_file = str(work / "duplicates.parquet")
        n_dups = backend.run_tasks(_find_duplicates, [(row_files, dups_file)], "ingest (duplicates)", **run)[0]
        plan = _part_slices(list(zip(row_files, row_counts)), cfg.rows_per_part)
        written = [out / fs.part_name(i) for i in range(len(plan))]
        calls = [(slices, start, dups_file, str(path)) for (start, slices), path in zip(plan, written)]
        counts: dict[str, int] = {}
        for part_counts in backend.run_tasks(_write_part, calls, "ingest (write)", unit="part", **run):
            for k, v in part_counts.items():
                counts[k] = counts.get(k, 0) + v
        keep = {p.name for p in written}
        for old in sorted((p for p in out.glob(fs.PART_GLOB) if p.name not in keep), key=lambda p: p.name):
            log.info("ingest: removing %s, an earlier run's part the input no longer fills", old)
            old.unlink()  # ingest wrote it: this folder carries ingest's marker
        fs.rmtree(work)
        jobcfg.save_resolved(cfg, out / CONFIG_FILE)
    rows = sum(row_counts)
    if rows == 0:
        log.warning("ingest: %s lists no audio file: wrote an empty clip table", input_path)
    detail = f"{rows} clip row(s) from {n_files} file(s): " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    if n_dups:
        detail += f" ({n_dups} duplicate(s))"
    return StageReport("ingest", len(written), 0, rows, time.perf_counter() - t0, counts, detail=detail)


def status_counts(table: pa.Table) -> dict[str, int]:
    return {d["values"]: d["counts"] for d in pc.value_counts(table.column(T.STATUS)).to_pylist()}


def bad_rows(folder: str | Path, limit: int = 50) -> str:
    """The first `limit` rows that are not `ok` (status, file, reason), read part by part."""
    lines, total = [], 0
    for part in fs.list_parts(folder):
        t = fs.read_table(part, columns=[T.AUDIO_PATH, T.STATUS, T.REASON])
        bad = t.filter(pc.not_equal(t.column(T.STATUS), T.OK))
        total += bad.num_rows
        for r in bad.slice(0, max(limit - len(lines), 0)).to_pylist():
            lines.append(f"  {r[T.STATUS]:8s} {r[T.AUDIO_PATH]}: {r[T.REASON]}")
    if total > len(lines):
        lines.append(f"  ... and {total - len(lines)} more")
    return "\n".join(lines)


def _check_input(path: str | Path) -> Path:
    fs.check_reachable(path, "ingest input")
    source = fs.location(fs.absolute(path))
    if not source.exists():
        raise FileNotFoundError(f"input {str(source)!r} is neither a folder nor a manifest file")
    return source


def cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mosaiq ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="folder (searched recursively) or manifest .csv/.jsonl/.parquet with a 'path' column")
    p.add_argument("--output", required=True, help="output folder for the clip table (part-NNNNN.parquet)")
    p.add_argument("--config", default=None, help="job YAML; its 'ingest' section sets the options below")
    p.add_argument("--clip-seconds", type=float, default=None, help=f"clip length (default {IngestConfig.clip_seconds})")
    p.add_argument("--policy", choices=["all", "first", "random"], default=None, help="which clips of a file (default all)")
    p.add_argument("--clips-per-file", type=int, default=None, help="clips per file for first/random (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--root", action="append", default=None, dest="roots",
                   help="folder the audio must be in (repeatable; default: the scanned folder or the manifest's folder)")
    p.add_argument("--allow-any-path", action="store_true", default=None,
                   help="no confinement: a manifest may name files anywhere")
    from pipeline.raycluster import add_ray_args, init_ray

    add_ray_args(p)
    a = p.parse_args(argv)
    cfg = jobcfg.load(IngestConfig, a.config, section="ingest" if a.config else None, clip_seconds=a.clip_seconds,
                      policy=a.policy, clips_per_file=a.clips_per_file, seed=a.seed,
                      roots=tuple(a.roots) if a.roots else None, allow_any_path=a.allow_any_path)
    _check_input(a.input)  # before Ray starts: a typo should not cost a cluster start
    init_ray(a.address, a.num_cpus)
    report = main(cfg, a.input, a.output)
    print(report.line())
    if report.status_counts.keys() - {T.OK}:
        print(bad_rows(a.output))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.cli import run_command
    from pipeline.ingest import cli as _cli  # the importable module, so Ray pickles its classes by reference

    sys.exit(run_command("ingest", _cli, None))
