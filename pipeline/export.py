"""Export: caption table -> WebDataset tar shards (stable-audio-tools layout), index, report, card.

`mosaiq export --input CAPTIONS --output SHARDS_DIR` writes into SHARDS_DIR (file names in
schemas/shard.py):

- `shard-NNNNNN.tar`: samples `<key>.flac` + `<key>.json`, key = clip_id (no dots, no `/`);
- `sizes.json` (shard -> sample count), `index.parquet` (clip -> shard, position),
  `SHA256SUMS` (`sha256sum -c` format), `export_report.json` (rows left out and why),
  the quality-stats JSON, `export_config.json` (the resolved config) and the dataset card.

How a run goes:
1. The driver reads the few columns it needs, keeps `ok` rows (the others go to the report),
   sorts them by clip_id (so the Parquet part layout does not matter), shuffles them with the
   seed and cuts them into shards by count and by an upper bound on bytes (uncompressed PCM).
2. One task per shard (`pipeline.shards.write_shard`, run by `pipeline.backend.run_tasks`)
   decodes each clip, encodes FLAC and writes a reproducible tar; a shard already complete
   for the same plan is skipped, so a killed run resumes.
3. The driver writes the index files, the report, the stats JSON, the config and the card.

This module plans and reports; `pipeline/shards.py` writes one shard. Neither imports Ray:
the caller starts it (the CLI below, or `curate`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # run as a script (`python pipeline/export.py`, `ray job submit`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import config as jobconfig
from pipeline import backend, card, fs
from pipeline.shards import (
    FLAC_BYTES_PER_SAMPLE,
    SAMPLE_OVERHEAD_BYTES,
    TAR_END_BYTES,
    ExportError,
    SampleSpec,
    ShardResult,
    ShardSpec,
    check_key,
    state_path,
    write_folder_index,
    write_shard,
)
from pipeline.stage import Resources, StageReport
from schemas import shard as S
from schemas import stats as Q
from schemas import tables as T

log = logging.getLogger(__name__)

STAGE = "export"

# Columns export reads from the caption table.
INPUT_COLUMNS = [
    T.CLIP_ID, T.AUDIO_PATH, T.SOURCE_DIGEST, T.START_S, T.DURATION_S, T.SOURCE_SAMPLE_RATE,
    T.SOURCE_CHANNELS, T.CAPTION_ORIGINAL, T.STATUS, T.REASON, T.PMOS, T.QUALITY_LEVEL,
    T.QUALITY_PREFIX, T.STATS_ID, T.CLAP_ORIGINAL, T.CLAP_SCORE, T.CAPTION, T.CAPTION_SOURCE, T.PROMPT,
]


@dataclass(frozen=True)
class ExportConfig:
    """Export settings; the only defaults. The input and output folders are arguments of `main`."""

    stats: str | None = None  # quality-stats JSON; None: find the one the rows' stats_id names (find_stats)
    seed: int = 0  # shuffle seed
    shard_max_count: int = 1000  # samples per shard at most
    shard_max_bytes: int = 1 << 30  # bound on a shard's size, counted as uncompressed PCM
    sample_rate: int | None = None  # None keeps each clip's source rate; else resample to this
    mono: bool = False  # False keeps the source channels (the trainer downmixes itself)
    flac_subtype: Literal["PCM_16", "PCM_24"] = "PCM_16"
    shard_prefix: str = "shard"
    card_examples: int = 12  # refined-caption examples in the dataset card
    # one shard-writing task per shard, with resources.num_cpus CPUs (batch_size, concurrency unused)
    resources: Resources = Resources(batch_size=1, concurrency=1, num_cpus=1.0)

    def __post_init__(self):
        if self.shard_max_count < 1:
            raise ValueError(f"shard_max_count must be >= 1, got {self.shard_max_count}")
        if self.shard_max_bytes < 1:
            raise ValueError(f"shard_max_bytes must be >= 1, got {self.shard_max_bytes}")
        if self.sample_rate is not None and self.sample_rate < 1:
            raise ValueError(f"sample_rate must be >= 1 or null, got {self.sample_rate}")
        if not S.KEY_RE.match(self.shard_prefix):
            raise ValueError(f"shard_prefix must match {S.KEY_RE.pattern}, got {self.shard_prefix!r}")
        if self.resources.num_cpus <= 0:
            raise ValueError(f"resources.num_cpus (CPUs per shard task) must be > 0, got {self.resources.num_cpus}")


# --- planning (driver) ------------------------------------------------------------------


def read_captions(folder: str | Path) -> pa.Table:
    """The columns export needs from every part of a caption table folder."""
    parts = fs.list_parts(folder)
    tables = []
    for p in parts:
        schema = fs.read_schema(p)
        T.require_columns(schema, INPUT_COLUMNS, f"export ({p.name})")
        extra = [c for c in card.FACT_COLUMNS if c in schema.names]  # shown in the dataset card
        tables.append(fs.read_table(p, columns=INPUT_COLUMNS + extra))
    return pa.concat_tables(tables)


def split_rows(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(ok rows, every other row), both sorted by clip_id; raises on bad or duplicate keys."""
    T.require_columns(table, INPUT_COLUMNS, "export")
    ids = table.column(T.CLIP_ID).to_pylist()
    bad = [k for k in ids if not isinstance(k, str) or not S.KEY_RE.match(k)]
    if bad:
        raise ExportError(f"refusing {len(bad)} sample key(s), e.g. {bad[:3]!r}: keys must match {S.KEY_RE.pattern}")
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
        name = f"{cfg.shard_prefix}-{len(shards):06d}{S.SHARD_EXT}"
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


# --- the run ----------------------------------------------------------------------------------


def find_stats(cfg: ExportConfig, input_dir: str | Path, ok: pa.Table) -> Path | None:
    """The quality-stats JSON: `cfg.stats`; else the first `_quality_stats.json` (what quantize
    writes in its folder) or `quality_stats.json` (a shards folder's copy, older quantize folders)
    inside the input folder, beside it, or in a sibling folder, whose id the rows carry."""
    if cfg.stats is not None:
        path = fs.location(cfg.stats)
        if not path.is_file():
            raise ExportError(f"stats file {cfg.stats!r} does not exist")
        return path
    inp = fs.location(input_dir)
    wanted = set(ok.column(T.STATS_ID).to_pylist())
    candidates = [p for name in (Q.STAGE_STATS_FILE, Q.STATS_FILE)
                  for p in [inp / name, inp.parent / name] + sorted(inp.parent.glob(f"*/{name}"), key=str)]
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


def remove_temporaries(out: Path) -> None:
    """Remove temporary files of killed runs or of retried tasks (shards and state records)."""
    for p in fs.remove_temporaries(out) + fs.remove_temporaries(out / S.STATE_DIR):
        log.info("export: removed the temporary file %s of an interrupted write", p)


def clean_output(out: Path, plan: list[ShardSpec], prefix: str) -> None:
    """Remove temporary files of killed runs, and shards (with state) that the plan no longer has."""
    planned = {s.name for s in plan}
    remove_temporaries(out)
    for p in sorted(out.glob(f"{prefix}-*{S.SHARD_EXT}"), key=lambda p: p.name):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}{re.escape(S.SHARD_EXT)}", p.name) and p.name not in planned:
            log.warning("export: removing %s, which the current plan does not have", p)
            p.unlink()
            state_path(out, p.name).unlink(missing_ok=True)


def write_index_files(out: Path, plan: list[ShardSpec], results: list[ShardResult]) -> None:
    """`sizes.json`, `SHA256SUMS` and `index.parquet` for the written shards (plan order)."""
    written = []
    for spec, result in zip(plan, results):
        failed = {key for key, _ in result.failed}
        written.append((result.name, result.sha256, [s.key for s in spec.samples if s.key not in failed]))
    write_folder_index(out, written)


def write_shards(plan: list[ShardSpec], out: Path, resources: Resources) -> list[ShardResult]:
    """One task per shard on the running Ray (`pipeline.backend.run_tasks`); results in plan order."""
    results = backend.run_tasks(write_shard, [(spec, str(out)) for spec in plan], desc=STAGE,
                                num_cpus=resources.num_cpus, max_retries=2, unit="shard")
    remove_temporaries(out)  # a task retried after its worker died leaves one
    return results


def main(cfg: ExportConfig, input_dir: str | Path, output_dir: str | Path) -> StageReport:
    """Export the caption table in `input_dir` to shards in `output_dir` (see the module
    docstring), on the Ray the caller started."""
    t0 = time.perf_counter()
    fs.list_parts(input_dir)  # a missing input is an error before the folder is claimed
    with fs.stage_output("export", input_dir, output_dir) as out:
        return _export(cfg, fs.location(fs.absolute(input_dir)), out, t0)


def _export(cfg: ExportConfig, input_dir: Path, out: Path, t0: float) -> StageReport:
    # 1. read and split the input; plan the shards
    table = read_captions(input_dir)
    ok, rest = split_rows(table)
    stats, stats_raw = load_stats(find_stats(cfg, input_dir, ok), ok)
    plan = plan_shards(ok, cfg)
    log.info("export: %d row(s), %d ok -> %d shard(s); %d left out", table.num_rows, ok.num_rows, len(plan), rest.num_rows)
    clean_output(out, plan, cfg.shard_prefix)
    # 2. write the shards, one task each
    results: list[ShardResult] = []
    if plan:
        results = write_shards(plan, out, cfg.resources)
    else:
        log.warning("export: no ok rows in %s: no shards written", input_dir)
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
    fs.atomic_write_text(out / S.REPORT_FILE, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if stats_raw is not None:
        fs.atomic_write_bytes(out / Q.STATS_FILE, stats_raw)
    else:
        (out / Q.STATS_FILE).unlink(missing_ok=True)  # an earlier run's copy would not apply
    jobconfig.save_resolved(cfg, out / S.CONFIG_FILE)
    card.write_card(out, table, report, stats, cfg.card_examples)
    status = dict(sorted(Counter(table.column(T.STATUS).to_pylist()).items()))
    stage = StageReport(STAGE, len(plan), sum(r.skipped for r in results), ok.num_rows, time.perf_counter() - t0, status,
                        detail=f"{ok.num_rows} sample(s) in {len(plan)} shard(s)")
    log.info("%s", stage.line())
    return stage


def build_parser() -> argparse.ArgumentParser:
    from pipeline.raycluster import add_ray_args

    p = argparse.ArgumentParser(prog="mosaiq export", description="caption table -> WebDataset shards, index and dataset card")
    p.add_argument("--config", default=None, help="job YAML; its `export` section is read")
    p.add_argument("--input", required=True, help="caption table folder (part-*.parquet)")
    p.add_argument("--output", required=True, help="shards folder")
    p.add_argument("--stats", default=None, help=f"quality-stats JSON (default: the {Q.STATS_FILE} inside, beside or next to --input whose id the rows carry)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--shard-max-count", type=int, default=None)
    p.add_argument("--shard-max-bytes", type=int, default=None)
    p.add_argument("--sample-rate", type=int, default=None, help="resample to this rate (default: keep the source rate)")
    p.add_argument("--mono", action="store_true", default=None, help="downmix to mono (default: keep channels)")
    add_ray_args(p)
    return p


def cli(argv: list[str] | None = None) -> int:
    from pipeline.raycluster import init_ray

    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "input", "output", "address", "num_cpus")}
    try:
        cfg = jobconfig.load(ExportConfig, args.config, section="export", **overrides)
        init_ray(args.address, args.num_cpus)
        report = main(cfg, args.input, args.output)
    except (jobconfig.ConfigError, ExportError, T.SchemaError, Q.StatsError, FileNotFoundError) as e:
        print(f"mosaiq export: error: {e}", file=sys.stderr)
        return 2
    print(report.line())
    print(f"shards in {args.output}; check them with: mosaiq verify {args.output}")
    return 0


if __name__ == "__main__":  # `python pipeline/export.py ...`, e.g. a `ray job submit` entrypoint
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipeline.cli import run_command
    from pipeline.export import cli as _cli  # the importable module, so Ray pickles by reference

    sys.exit(run_command("export", _cli, None))
