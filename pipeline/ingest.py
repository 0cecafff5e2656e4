"""ingest: a folder of audio or a manifest (CSV, JSONL, Parquet) -> the clip table.

Each file is probed (header plus its last second; never decoded in full), split into clips of
`clip_seconds` by a policy (all clips, the first N, or N at seeded random offsets), and given a
deterministic `clip_id`. Files that cannot be used become one `error` or `rejected` row with
the reason, so every input file ends in at least one row and nothing is dropped silently.

    mosaiq ingest --input MUSIC_DIR_OR_MANIFEST --output CLIPS [--config jobs/curate.yaml]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script (`python pipeline/ingest.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from jobs import config as jobcfg
from pipeline import audio, fs
from pipeline.stage import StageReport
from schemas import tables as T

log = logging.getLogger(__name__)

CONFIG_FILE = "ingest_config.json"

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
    workers: int = 4  # files probed at once

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

    path = Path(os.path.abspath(path))
    suffix = path.suffix.lower()
    if suffix == ".csv":
        df = pd.read_csv(path, dtype=str)  # empty cells and NaN/NA/null read as missing, not as text
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=True, dtype=False)
    elif suffix == ".parquet":
        df = pd.read_parquet(path)
    else:
        raise ValueError(f"manifest {str(path)!r}: unknown type {suffix!r}; expected .csv, .jsonl or .parquet")
    if PATH_COLUMN not in df.columns:
        raise ValueError(f"manifest {str(path)!r} has no {PATH_COLUMN!r} column; it has {list(df.columns)}")
    extra = [c for c in df.columns if c not in (PATH_COLUMN, CAPTION_COLUMN, TAGS_COLUMN)]
    rows = []
    for rec in df.to_dict(orient="records"):
        p = _clean_text(rec[PATH_COLUMN])
        if p and "://" not in p:
            p = os.path.normpath(os.path.join(path.parent, p))  # relative to the manifest, stored absolute
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


def scan_folder(folder: str | Path) -> list[SourceRow]:
    """Every file under `folder` with an audio extension, sorted by path, stored absolute.

    A symlink is listed even when it cannot be followed (a loop, a dangling link), so it ends
    as an `error` row instead of vanishing."""
    folder = Path(os.path.abspath(folder))
    files = sorted(p for p in folder.rglob("*")
                   if p.suffix.lower() in audio.AUDIO_EXTENSIONS and (p.is_symlink() or p.is_file()))
    return [SourceRow(path=str(p)) for p in files]


def read_input(path: str | Path) -> tuple[list[SourceRow], Path]:
    """Rows from a folder or a manifest, and the folder that is the default root."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        return scan_folder(path), path
    if path.is_file():
        return read_manifest(path), path.parent
    raise FileNotFoundError(f"input {str(path)!r} is neither a folder nor a manifest file")


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
    following symlinks. Decided from the path alone, the same way whether or not the file exists."""
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
    if "://" in src.path:
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: f"remote paths are not supported by ingest yet: {src.path}"})]
    path = Path(src.path)
    if roots and not inside_roots(src.path, roots):
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: f"{T.OUTSIDE_ROOTS} {[str(r) for r in roots]}"})]
    try:
        before = path.stat()
        info = audio.probe(path)
        digest = fs.file_digest(path)
        after = path.stat()
    except audio.AudioError as e:
        return [_row(src, **{T.STATUS: e.status, T.REASON: e.reason})]
    except OSError as e:
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: f"unreadable: {e.strerror or e}"})]
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return [_row(src, **{T.STATUS: T.ERROR, T.REASON: "the file changed while it was being ingested"})]
    meta = {
        T.SOURCE_DIGEST: digest,
        T.SOURCE_DURATION_S: info.duration_s,
        T.SOURCE_SAMPLE_RATE: info.sample_rate,
        T.SOURCE_CHANNELS: info.channels,
        T.SOURCE_FORMAT: info.format,
        T.SOURCE_SIZE_BYTES: after.st_size,
        T.SOURCE_MTIME_NS: after.st_mtime_ns,
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
            r[T.STATUS] = T.REJECTED
            r[T.REASON] = f"duplicate: same audio as {first[cid]}"
            r[T.CLIP_ID] = clip_id(f"dup:{r[T.AUDIO_PATH]}:{len(first)}", r[T.START_S], r[T.DURATION_S])
        first.setdefault(r[T.CLIP_ID], r[T.AUDIO_PATH])


def ingest_rows(sources: list[SourceRow], cfg: IngestConfig, roots: list[Path], progress: bool = True) -> pa.Table:
    """The clip table for these sources, in input order."""
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool:
        results = list(tqdm(pool.map(lambda s: ingest_file(s, cfg, roots), sources), total=len(sources),
                            desc="ingest", unit="file", disable=not progress))
    rows = [r for file_rows in results for r in file_rows]
    _mark_duplicates(rows)
    if not rows:
        return T.CLIPS_SCHEMA.empty_table()
    return pa.Table.from_pylist(rows, schema=T.CLIPS_SCHEMA)


def resolve_roots(cfg: IngestConfig, default_root: Path) -> list[Path]:
    """The folders files must be in: the configured roots, else the scanned folder or the
    manifest's folder; none with `allow_any_path`."""
    if cfg.allow_any_path:
        return []
    return [Path(os.path.normpath(os.path.abspath(r))) for r in (cfg.roots or (str(default_root),))]


def main(cfg: IngestConfig, input_path: str | Path, output_dir: str | Path, progress: bool = True) -> StageReport:
    """Ingest a folder or manifest into `output_dir/part-NNNNN.parquet`.

    Every file is probed again on each run (cheap: headers and last seconds); a part that comes
    out with the same bytes as before is left untouched, so the stages downstream skip it.
    """
    t0 = time.perf_counter()
    sources, default_root = read_input(input_path)
    roots = resolve_roots(cfg, default_root)
    log.info("ingest: %d file(s) from %s", len(sources), input_path)
    table = ingest_rows(sources, cfg, roots, progress=progress)
    if table.num_rows == 0:
        log.warning("ingest: %s lists no audio file: writing an empty clip table", input_path)
    with fs.stage_output("ingest", input_path, output_dir) as out:
        written = fs.write_parts(table, out, cfg.rows_per_part)
        for old in sorted(set(out.glob(fs.PART_GLOB)) - set(written)):
            log.info("ingest: removing %s, an earlier run's part the input no longer fills", old)
            old.unlink()  # ingest wrote it: this folder carries ingest's marker
        jobcfg.save_resolved(cfg, out / CONFIG_FILE)
    return StageReport("ingest", len(written), 0, table.num_rows, time.perf_counter() - t0, status_counts(table),
                       detail=summarize(table).splitlines()[0])


def status_counts(table: pa.Table) -> dict[str, int]:
    import pyarrow.compute as pc

    return {d["values"]: d["counts"] for d in pc.value_counts(table.column(T.STATUS)).to_pylist()}


def summarize(table: pa.Table) -> str:
    import pyarrow.compute as pc

    counts = status_counts(table)
    lines = [f"{table.num_rows} clip row(s): " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items()))]
    bad = table.filter(pc.not_equal(table.column(T.STATUS), T.OK))
    for r in bad.select([T.AUDIO_PATH, T.STATUS, T.REASON]).to_pylist():
        lines.append(f"  {r[T.STATUS]:8s} {r[T.AUDIO_PATH]}: {r[T.REASON]}")
    return "\n".join(lines)


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
    a = p.parse_args(argv)
    cfg = jobcfg.load(IngestConfig, a.config, section="ingest" if a.config else None, clip_seconds=a.clip_seconds,
                      policy=a.policy, clips_per_file=a.clips_per_file, seed=a.seed,
                      roots=tuple(a.roots) if a.roots else None, allow_any_path=a.allow_any_path)
    from pipeline.backend import read_folder

    main(cfg, a.input, a.output)
    print(summarize(read_folder(a.output)))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.cli import run_command
    from pipeline.ingest import cli as _cli  # the importable module, so Ray pickles its classes by reference

    sys.exit(run_command("ingest", _cli, None))
