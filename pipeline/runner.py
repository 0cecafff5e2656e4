"""The thin Ray Data adapter that runs a row-wise stage over a Parquet folder, resumably.

A stage's input and output are folders of `part-NNNNN.parquet` files. Output part `p` holds
exactly the rows of input part `p`, in the same order, so every input row ends in exactly one
output row and a re-run over the same input produces the same bytes.

How a run goes:
1. Input parts whose output part already exists are skipped.
2. The rows of the pending parts stream through `map_batches` with the stage's callable class
   (loaded once per actor), and Ray Data writes the results to `<output>/_work/`.
   Rows already in `_work/` from a killed run are not computed again.
3. One Ray task per pending part gathers that part's rows from `_work/`, puts them in input
   order, checks the count, and writes the output part under a temporary name, then renames it.
4. `_work/` is removed once every part is final.

The stage classes know nothing of Ray: `cls(**kwargs)(table: pa.Table) -> pa.Table`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from schemas import tables as T

log = logging.getLogger(__name__)

PART_GLOB = "part-*.parquet"
WORK_DIR = "_work"
_PART_COL = "__mosaiq_part"  # which input part a row came from (work files only)
_RAY_PATH_COL = "path"  # what read_parquet(include_paths=True) adds
_MAX_BLOCKS = 20_000


@dataclass(frozen=True)
class Resources:
    """How a model stage runs on Ray: job config, not code."""

    batch_size: int = 16
    concurrency: int = 1  # actors in the pool
    num_cpus: float = 1.0  # per actor
    num_gpus: float = 0.0  # per actor

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus/num_gpus must be >= 0, got {self.num_cpus}/{self.num_gpus}")


@dataclass
class StageReport:
    stage: str
    parts_total: int
    parts_skipped: int
    rows_written: int
    seconds: float
    status_counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.status_counts.items()))
        return (
            f"{self.stage}: {self.parts_total} part(s), {self.parts_skipped} already done, "
            f"{self.rows_written} row(s) written in {self.seconds:.1f}s [{counts}]"
        )


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def list_parts(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {str(folder)!r} does not exist")
    parts = sorted(folder.glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"input folder {str(folder)!r} holds no {PART_GLOB} files")
    return parts


def write_table_atomic(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file under a temporary name, then rename it (same input -> same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_parts(table: pa.Table, folder: str | Path, rows_per_part: int) -> list[Path]:
    """Split a table into `part-NNNNN.parquet` files of at most `rows_per_part` rows."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    folder = Path(folder)
    paths = []
    n_parts = max(1, -(-table.num_rows // rows_per_part))
    for i in range(n_parts):
        path = folder / part_name(i)
        write_table_atomic(table.slice(i * rows_per_part, rows_per_part), path)
        paths.append(path)
    return paths


def read_folder(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read every part of a stage folder (tests, reports and small tables only)."""
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in list_parts(folder)])


def status_counts(folder: str | Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in list_parts(folder):
        vc = pc.value_counts(pq.read_table(p, columns=[T.STATUS]).column(T.STATUS))
        for item in vc.to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


class _StageActor:
    """Wraps a stage callable: keeps the part tag beside its output, checks one row per row."""

    def __init__(self, stage_cls, stage_kwargs: dict, done_ids: pa.Array | None):
        self.stage = stage_cls(**stage_kwargs)
        self.done_ids = done_ids

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = [os.path.basename(p) for p in batch.column(_RAY_PATH_COL).to_pylist()]
        batch = batch.drop_columns([_RAY_PATH_COL])
        if self.done_ids is not None and len(self.done_ids):
            keep = pc.invert(pc.is_in(batch.column(T.CLIP_ID), value_set=self.done_ids))
            batch = batch.filter(keep)
            names = [n for n, k in zip(names, keep.to_pylist()) if k]
        if batch.num_rows == 0:
            return _empty_work_table(self.stage)
        out = self.stage(batch)
        if out.num_rows != batch.num_rows:
            raise RuntimeError(f"stage {type(self.stage).__name__} returned {out.num_rows} rows for {batch.num_rows}")
        return out.append_column(_PART_COL, pa.array(names, pa.string()))


def _empty_work_table(stage) -> pa.Table:
    schema = stage.output_schema.append(pa.field(_PART_COL, pa.string()))
    return schema.empty_table()


def _part_work_dir(work_dir: Path, part: str) -> Path:
    """Where Ray writes one input part's rows (hive-style partition by the part tag)."""
    return work_dir / f"{_PART_COL}={part}"


def _readable_work_files(work_dir: Path) -> list[Path]:
    """Work files from earlier runs; files a killed writer left half-written are removed."""
    good = []
    for f in sorted(work_dir.glob("*/*.parquet")) if work_dir.is_dir() else []:
        try:
            pq.read_metadata(f)
            good.append(f)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a partial write
            log.warning("removing unreadable work file %s (%s)", f, e)
            f.unlink()
    return good


def _finalize_part(input_part: str, work_dir: str, output_part: str, schema: pa.Schema) -> int:
    """Gather one part's rows from the work folder, in input order, and write it atomically."""
    ids = pq.read_table(input_part, columns=[T.CLIP_ID]).column(T.CLIP_ID)
    name = os.path.basename(input_part)
    files = sorted(str(f) for f in _part_work_dir(Path(work_dir), name).glob("*.parquet"))
    if not files:
        raise RuntimeError(f"{name}: the stage wrote no rows for this part")
    rows = pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")
    if _PART_COL in rows.column_names:
        rows = rows.drop_columns([_PART_COL])
    # a killed run can leave the same row in two work files; they are identical, keep one
    order = pc.index_in(ids, value_set=rows.column(T.CLIP_ID))
    if order.null_count:
        missing = ids.filter(pc.is_null(order)).to_pylist()[:5]
        raise RuntimeError(f"{name}: {order.null_count} row(s) missing from the stage output, e.g. {missing}")
    write_table_atomic(T.conform(rows.take(order), schema), output_part)  # exact types and table metadata
    return len(ids)


def _warn_if_no_cpu_left(stage: str, resources: Resources, cluster_cpus: float) -> bool:
    """Warn when the model actors would hold every CPU of the cluster: Ray Data's read and write
    tasks (1 CPU each) then never start and the run waits forever. A warning, not an error: an
    autoscaling cluster may add nodes."""
    held = resources.num_cpus * resources.concurrency
    if cluster_cpus and held > cluster_cpus - 1:
        log.warning(
            "%s: %d actor(s) x %.2g CPU = %.2g of the cluster's %.2g CPUs leaves less than 1 CPU for "
            "reading and writing parts, which then wait forever unless nodes are added: lower "
            "num_cpus or concurrency", stage, resources.concurrency, resources.num_cpus, held, cluster_cpus,
        )
        return True
    return False


def run_stage(
    stage: str,
    input_dir: str | Path,
    output_dir: str | Path,
    stage_cls: type,
    stage_kwargs: dict[str, Any],
    resources: Resources,
    on_finish: Callable[[Path], None] | None = None,
) -> StageReport:
    """Run a row-wise stage class over every pending input part (see the module docstring).

    `stage_cls(**stage_kwargs)` must be picklable by reference and expose `output_schema`.
    """
    import ray

    t0 = time.perf_counter()
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    parts = list_parts(input_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    pending = [p for p in parts if not (output_dir / p.name).exists()]
    skipped = len(parts) - len(pending)
    if not pending:
        log.info("%s: all %d part(s) already in %s; nothing to do", stage, len(parts), output_dir)
        return StageReport(stage, len(parts), skipped, 0, time.perf_counter() - t0, status_counts(output_dir))
    log.info("%s: %d of %d part(s) to do (%d already done)", stage, len(pending), len(parts), skipped)

    _warn_if_no_cpu_left(stage, resources, ray.cluster_resources().get("CPU", 0.0))
    work_dir = output_dir / WORK_DIR
    work_files = _readable_work_files(work_dir)
    done_ids = None
    if work_files:
        done_ids = pads.dataset([str(f) for f in work_files], format="parquet").to_table(columns=[T.CLIP_ID]).column(T.CLIP_ID)
        done_ids = pc.unique(done_ids.combine_chunks())
        log.info("%s: resuming, %d row(s) already computed by an earlier run", stage, len(done_ids))

    # about one block per model batch: the progress display moves batch by batch and every
    # actor of the pool gets work even when there are fewer parts than actors
    rows_pending = sum(pq.read_metadata(p).num_rows for p in pending)
    blocks = max(len(pending), min(_MAX_BLOCKS, -(-rows_pending // resources.batch_size)))
    ds = ray.data.read_parquet([str(p) for p in pending], include_paths=True, override_num_blocks=blocks)
    ds = ds.map_batches(
        _StageActor,
        fn_constructor_kwargs={"stage_cls": stage_cls, "stage_kwargs": stage_kwargs, "done_ids": done_ids},
        batch_size=resources.batch_size,
        batch_format="pyarrow",
        concurrency=resources.concurrency,
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )
    # one folder per input part, so finalizing a part reads only its own rows
    ds.write_parquet(str(work_dir), partition_cols=[_PART_COL])

    finalize = ray.remote(num_cpus=0.5)(_finalize_part)
    schema = stage_cls.output_schema
    refs = [finalize.remote(str(p), str(work_dir), str(output_dir / p.name), schema) for p in pending]
    rows = sum(ray.get(refs))
    shutil.rmtree(work_dir, ignore_errors=True)
    if on_finish is not None:
        on_finish(output_dir)
    report = StageReport(stage, len(parts), skipped, rows, time.perf_counter() - t0, status_counts(output_dir))
    log.info("%s", report.line())
    return report
