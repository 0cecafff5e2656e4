"""The one Ray backend: every stage runs on Ray through the three shapes here, and no stage
module imports `ray`.

- `map_parts`: run a row-wise stage class (`pipeline.stage.Stage`) over a folder of Parquet
  parts with Ray Data, resumably (score, quantize's pass 2, caption's CLAP step, ...). A stage
  with a `prepare(table, **kwargs)` static method (decoding: CPU, no model) gets it run as CPU
  tasks of the same pipeline ahead of its actors, so the actors only run the model.
- `run_tasks`: run independent tasks (one function, many argument tuples) with a progress
  display, results in order (ingest, export's shards, caption's per-part steps); `local=True`
  runs the same calls in this process (pure tests, no Ray).
- `aggregate_parts`: one partial per part computed where the part is, merged on the driver in a
  canonical order (quantize's moments and report).
- `map_llm`: stream the rows of some parts through a `ray.data.llm` processor into a work folder
  (caption's LLM step).

How `map_parts` goes:
1. Output part `p` holds exactly the rows of input part `p`, in the same order. It records in
   its Parquet metadata the digest of the input part it was made from, of the stage's output
   schema and of its `params` (`config_params`: the stage's config less how it runs, and the
   stamps of its model files); a part whose output exists with the same digest is skipped, any
   other is computed again (resume by content, not by name: a changed config, model or mosaiq
   version that writes other columns recomputes it). Output parts with no input part any more
   are removed.
2. The rows of the pending parts stream through `map_batches`: the stage's `prepare` in CPU
   tasks (when it has one), then the stage class on a pool of actors (loaded once per actor),
   which writes each batch's rows to `<output>/_work/`, one folder per part and input digest,
   and hands back only a count (the driver's progress display). Rows already there from a
   killed run are not computed again. A stage that names `reuse_on` (score) first takes the
   result of each `ok` row from the part's previous output when that output was made under the
   same params and holds an `ok` row with the same values in those columns: a changed earlier
   setting (an analyze threshold) then re-runs no model on clips it scored before.
3. One Ray task per pending part gathers that part's rows from `_work/`, puts them in input
   order, checks the count, and writes the output part atomically.
4. `_work/` is removed once every part is final.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import fs
from pipeline.stage import Resources, StageReport
from schemas import tables as T

log = logging.getLogger(__name__)

WORK_DIR = "_work"
INPUT_DIGEST_KEY = b"mosaiq.input_digest"  # output part metadata: what it was made from
PARAMS_KEY = b"mosaiq.params"  # output part metadata: the stage params alone (row reuse)
_PART_COL = "__mosaiq_part"  # which input part (and digest) a row came from (work files only)
_RAY_PATH_COL = "path"  # what read_parquet(include_paths=True) adds
_COUNT_COL = "__mosaiq_rows"  # what the writing steps hand back to the driver: a row count
_MAX_BLOCKS = 20_000


# --- small helpers every shape uses ----------------------------------------------------------


def _ray():
    import ray

    return ray


def ray_running() -> bool:
    """Whether this process is connected to Ray (started or joined by `init_ray` or a test)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


def quiet_ray_data() -> None:
    """Ray Data's own progress (a bar per operator, or a status dump every 10 s in a log) is
    off: each step shows one `_Progress` of its own instead."""
    ray = _ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # its issue detectors repeat a multi-line warning every 30 s ("uses 2.5GiB of memory per
    # worker"): once every 10 minutes is enough in a log
    for name in ("high_memory_detector_config", "hanging_detector_config"):
        detector = getattr(getattr(ctx, "issue_detectors_config", None), name, None)
        if detector is not None and hasattr(detector, "detection_time_interval_s"):
            detector.detection_time_interval_s = max(detector.detection_time_interval_s, 600)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Starting execution", plans
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled"


def read_folder(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read every part of a stage folder (tests, reports and small tables only)."""
    return pa.concat_tables([fs.read_table(p, columns=columns) for p in fs.list_parts(folder)])


def _use_storage(storage: dict) -> None:
    """In a Ray worker: the driver's storage options (a job YAML's `storage_options`) and
    storage environment, so its tasks open object storage as the driver does."""
    fs.use_storage_state(storage)


def _with_storage(storage: dict, fn: Callable[..., Any], *args) -> Any:
    _use_storage(storage)
    return fn(*args)


def status_counts(folder: str | Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in fs.list_parts(folder):
        vc = pc.value_counts(fs.read_table(p, columns=[T.STATUS]).column(T.STATUS))
        for item in vc.to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


class _Progress:
    """One display per step: a progress bar with the rate on a terminal; otherwise (a log, a
    `ray job submit`) a line at most every `every_s` seconds and one at the end."""

    def __init__(self, desc: str, total: int | None, unit: str, every_s: float = 60.0, show: bool = True):
        self.desc, self.total, self.unit, self.every_s, self.show = desc, total, unit, every_s, show
        self.n, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=False, smoothing=0.1)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.perf_counter()
        if self.show and now - self.last >= self.every_s:
            self.last = now
            self._log(now)

    def _log(self, now: float) -> None:
        seconds = now - self.t0
        of = f"/{self.total}" if self.total is not None else ""
        log.info("%s: %d%s %s(s) in %.0fs (%.1f %s/s)", self.desc, self.n, of, self.unit, seconds,
                 self.n / max(seconds, 1e-9), self.unit)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.show and self.n:
            self._log(time.perf_counter())


# --- arrays between steps ----------------------------------------------------------------------

WAVE_TYPE = pa.large_list(pa.float32())  # one clip's samples per row; null: no audio (a bad row)


def wave_column(waves: Sequence[Any]) -> pa.Array:
    """float32 arrays (or None) -> a `large_list<float32>` column, one clip per row."""
    lengths = [0 if w is None else len(w) for w in waves]
    offsets = np.zeros(len(waves) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    chunks = [np.asarray(w, np.float32).ravel() for w in waves if w is not None]
    values = pa.array(np.concatenate(chunks) if chunks else np.zeros(0, np.float32), pa.float32())
    mask = pa.array([w is None for w in waves], pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values, mask=mask)


def column_waves(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray | None]:
    """The inverse of `wave_column`: one float32 array (a view, no copy) or None per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]: offsets[i + 1]] if valid[i] else None for i in range(len(column))]


# --- shape 2: independent tasks --------------------------------------------------------------


def run_tasks(
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    desc: str,
    num_cpus: float = 1.0,
    max_retries: int = 0,
    unit: str = "task",
    num_gpus: float = 0.0,
    sizes: Sequence[int] | None = None,
    local: bool = False,
    show: bool = True,
) -> list[Any]:
    """Run `fn(*args)` for every `args` in `calls` as Ray tasks; results in the order of `calls`.

    `fn` must be importable (a module-level function), so Ray pickles it by reference. The
    progress display counts `sizes[i]` units for call i (default 1: tasks); `num_gpus` is each
    task's GPU request. `local=True` runs
    the calls one after another in this process instead (the same results; no Ray needed).
    """
    if not calls:
        return []
    sizes = list(sizes) if sizes is not None else [1] * len(calls)
    progress = _Progress(desc, sum(sizes), unit, show=show)
    results: list[Any] = [None] * len(calls)
    try:
        if local:
            for i, args in enumerate(calls):
                results[i] = fn(*args)
                progress.update(sizes[i])
            return results
        ray = _ray()
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(_with_storage)
        storage = fs.storage_state()
        refs = [task.remote(storage, fn, *args) for args in calls]
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                i = index[ref]
                results[i] = ray.get(ref)
                progress.update(sizes[i])
    finally:
        progress.close()
    return results


# --- shape 3: per-part partials --------------------------------------------------------------


def _partial_of_part(partial: Callable[[pa.Table], Any], part: str, columns: list[str] | None) -> Any:
    return partial(fs.read_table(part, columns=columns))


def aggregate_parts(
    parts: Iterable[str | Path],
    partial: Callable[[pa.Table], Any],
    combine: Callable[[list[Any]], Any],
    columns: list[str] | None = None,
    desc: str = "aggregate",
    num_cpus: float = 0.5,
) -> Any:
    """`combine([partial(part) for part in parts])`, each partial computed in a Ray task that
    reads only `columns` of its part; partials reach `combine` in part order, so the result does
    not depend on which task finishes first."""
    calls = [(partial, str(p), columns) for p in parts]
    return combine(run_tasks(_partial_of_part, calls, desc, num_cpus=num_cpus, unit="part", show=False))


# --- shape 1: a row-wise stage over parts ------------------------------------------------------


def config_params(cfg: Any, leave_out: Iterable[str] = ("resources",), files: Iterable[str | None] = ()) -> str:
    """The `params` of a stage's parts: its resolved config without the keys (at any depth)
    that only say how it runs, plus `fs.stamp` of each model file or folder in `files`."""
    import json

    from jobs.config import to_dict

    leave_out = set(leave_out)

    def strip(v: Any) -> Any:
        return {k: strip(x) for k, x in v.items() if k not in leave_out} if isinstance(v, dict) else v

    body = strip(to_dict(cfg))
    stamps = [fs.stamp(f) for f in files if f]
    if stamps:
        body = {"config": body, "files": stamps}
    return fs.text_digest(json.dumps(body, sort_keys=True, default=str))


def stage_params(output_schema: pa.Schema, params: str = "") -> str:
    """`params` with the stage's output schema: parts an older mosaiq wrote with other columns
    are recomputed."""
    return fs.text_digest(f"{output_schema.remove_metadata().to_string()}|{params}")


def input_digest(part: str | Path, params: str = "") -> str:
    """What an output part is made from: the input part's bytes and the stage's params."""
    digest = fs.file_digest(part)
    return fs.text_digest(f"{digest}|{params}") if params else digest


def recorded_digest(part: str | Path) -> str | None:
    """The input digest an output part records, or None (absent, unreadable, or not ours)."""
    try:
        meta = fs.read_schema(part).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    value = meta.get(INPUT_DIGEST_KEY)
    return value.decode() if value else None


def with_digest(table: pa.Table, digest: str, params: str | None = None) -> pa.Table:
    """`table` with the input digest (and the stage params) in its schema metadata, kept beside
    the table's own."""
    meta = dict(table.schema.metadata or {})
    meta[INPUT_DIGEST_KEY] = digest.encode()
    if params is not None:
        meta[PARAMS_KEY] = params.encode()
    return table.replace_schema_metadata(meta)


def _row_keys(table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """One text key a row from the values of `columns` (a unit separator between them)."""
    cols = [pc.fill_null(pc.cast(table.column(c), pa.string()), "\x00") for c in columns]
    return pc.binary_join_element_wise(*cols, "\x1f") if len(cols) > 1 else cols[0]


def _reuse_previous(stage_cls, stage_kwargs: dict, input_part: str, previous: str, params: str, work_dir: str,
                    tag: str) -> tuple[int, int]:
    """Write into the part's work folder, as if an earlier run had computed them, the rows that
    need no model: the `ok` input rows whose result the part's previous output already holds
    (made under the same `params`, `ok` there, equal in `stage_cls.reuse_on`), and the rows that
    are not `ok` (passed through). Returns (`ok` rows reused, rows written); (0, 0) when there
    is no such output."""
    try:
        meta = fs.read_schema(previous).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return 0, 0
    if meta.get(PARAMS_KEY) != params.encode():
        return 0, 0
    key = list(stage_cls.reuse_on)
    own = [c for c in stage_cls.output_schema.names if c not in stage_cls.input_schema.names]
    before = fs.read_table(previous, columns=[*key, T.STATUS, *own])
    before = before.filter(pc.equal(before.column(T.STATUS), T.OK))
    rows = fs.read_table(input_part)
    ok = pc.equal(rows.column(T.STATUS), T.OK)
    at = pc.index_in(_row_keys(rows, key), value_set=_row_keys(before, key))  # (rows,) position in `before`
    at = pc.if_else(ok, at, pa.scalar(None, at.type))  # only `ok` rows take an earlier result
    found = pc.sum(pc.is_valid(at)).as_py() or 0
    if not found:
        return 0, 0
    take = pc.or_(pc.is_valid(at), pc.invert(ok))
    rows, at = rows.filter(take), at.filter(take)
    out = T.conform(stage_cls.reuse(rows, before.select(own).take(at), **stage_kwargs), stage_cls.output_schema)
    _write_work(out, fs.location(work_dir), tag)
    return found, out.num_rows


def plan_parts(input_dir: str | Path, output_dir: str | Path, params: str = "", stage: str = "stage") -> tuple[list[Path], dict[str, str], int]:
    """(input parts, digest of each input part by name, parts already done).

    An output part is done when it records the digest of its input part as it is now. Output
    parts whose input part is gone are removed (this stage wrote them: they record a digest).
    """
    parts = fs.list_parts(input_dir)
    output_dir = fs.location(output_dir)
    digests = {p.name: input_digest(p, params) for p in parts}
    done = 0
    if output_dir.is_dir():
        names = set(digests)
        for old in sorted(output_dir.glob(fs.PART_GLOB), key=lambda p: p.name):
            if old.name not in names and recorded_digest(old) is not None:
                log.info("%s: removing %s, whose input part is gone", stage, old)
                old.unlink()
        done = sum(recorded_digest(output_dir / p.name) == digests[p.name] for p in parts)
    return parts, digests, done


def pending_parts(parts: list[Path], digests: dict[str, str], output_dir: Path) -> list[Path]:
    return [p for p in parts if recorded_digest(fs.location(output_dir) / p.name) != digests[p.name]]


def _drop_done(batch: pa.Table, done_ids: pa.Array | None) -> pa.Table:
    """`batch` less the rows an earlier (killed) run already computed."""
    if done_ids is None or not len(done_ids) or batch.num_rows == 0:
        return batch
    return batch.filter(pc.invert(pc.is_in(batch.column(T.CLIP_ID), value_set=done_ids)))


def _prepare_batch(batch: pa.Table, stage_cls, stage_kwargs: dict, done_ids: pa.Array | None, storage: dict) -> pa.Table:
    """The CPU step ahead of the actors: `stage_cls.prepare` (decoding) on the rows still to do."""
    _use_storage(storage)
    batch = _drop_done(batch, done_ids)
    paths = batch.column(_RAY_PATH_COL)
    out = stage_cls.prepare(batch.drop_columns([_RAY_PATH_COL]), **stage_kwargs)
    if out.num_rows != batch.num_rows:
        raise RuntimeError(f"{stage_cls.__name__}.prepare returned {out.num_rows} rows for {batch.num_rows}")
    return out.append_column(_RAY_PATH_COL, paths)


def _count(n: int) -> pa.Table:
    return pa.table({_COUNT_COL: pa.array([n], pa.int64())})


class _StageActor:
    """Runs a stage callable on a batch, checks one row per row, and writes the rows to the work
    folder of the part each came from; hands back only the row count."""

    def __init__(self, stage_cls, stage_kwargs: dict, done_ids: pa.Array | None, tags: dict[str, str], work_dir: str,
                 storage: dict):
        _use_storage(storage)
        self.stage = stage_cls(**stage_kwargs)
        self.done_ids = done_ids
        self.tags = tags  # input part file name -> work tag (name and digest)
        self.work_dir = fs.location(work_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = _drop_done(batch, self.done_ids)
        names = pa.array([self.tags[os.path.basename(p)] for p in batch.column(_RAY_PATH_COL).to_pylist()], pa.string())
        batch = batch.drop_columns([_RAY_PATH_COL])
        if batch.num_rows == 0:
            return _count(0)
        out = self.stage(batch)
        if out.num_rows != batch.num_rows:
            raise RuntimeError(f"stage {type(self.stage).__name__} returned {out.num_rows} rows for {batch.num_rows}")
        for tag in pc.unique(names).to_pylist():
            _write_work(out.filter(pc.equal(names, tag)), self.work_dir, tag)
        return _count(out.num_rows)


def _drain(ds, progress: _Progress) -> int:
    """Execute a dataset whose rows are counts (the steps above write their own output), updating
    the progress display; only the counts reach the driver."""
    total = 0
    try:
        for counts in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            n = int(pc.sum(counts.column(_COUNT_COL)).as_py() or 0)
            total += n
            progress.update(n)
    finally:
        progress.close()
    return total


def _work_tag(name: str, digest: str) -> str:
    return f"{name}_{digest[:16]}"  # characters a hive partition folder keeps as they are


def work_folder(output_dir: str | Path, input_part: str | Path, params: str = "") -> Path:
    """Where `run_parts` keeps the computed rows of one input part until it writes the part."""
    part = fs.location(input_part)
    return _part_work_dir(fs.location(fs.absolute(output_dir)) / WORK_DIR, _work_tag(part.name, input_digest(part, params)))


def _part_work_dir(work_dir: Path, tag: str) -> Path:
    """Where Ray writes one input part's rows (hive-style partition by the part tag)."""
    return work_dir / f"{_PART_COL}={tag}"


def _write_work(rows: pa.Table, work_dir: Path, tag: str) -> None:
    """Computed rows of one input part into its work folder, named by their clip ids (the same
    rows written again, by a retried task, land under the same name)."""
    name = fs.text_digest("|".join(rows.column(T.CLIP_ID).to_pylist()))
    fs.atomic_write_table(rows, _part_work_dir(work_dir, tag) / f"{name}.parquet")


def readable_work_files(folders: Iterable[Path]) -> list[Path]:
    """Parquet files of earlier runs in these folders; files a killed writer left half-written
    are removed."""
    good = []
    for folder in folders:
        for f in sorted(folder.glob("*.parquet"), key=lambda p: p.name) if folder.is_dir() else []:
            try:
                fs.read_metadata(f)
                good.append(f)
            except Exception as e:  # noqa: BLE001 - any unreadable file is a partial write
                log.warning("removing unreadable work file %s (%s)", f, e)
                f.unlink()
    return good


def _finalize_part(input_part: str, work_dir: str, tag: str, output_part: str, schema: pa.Schema, digest: str,
                   params: str | None = None) -> int:
    """Gather one part's rows from the work folder, in input order, and write it atomically."""
    ids = fs.read_table(input_part, columns=[T.CLIP_ID]).column(T.CLIP_ID)
    name = fs.location(input_part).name
    if len(ids) == 0:
        fs.atomic_write_table(with_digest(schema.empty_table(), digest, params), output_part)
        return 0
    files = sorted(str(f) for f in _part_work_dir(fs.location(work_dir), tag).glob("*.parquet"))
    if not files:
        raise RuntimeError(f"{name}: the stage wrote no rows for this part")
    rows = pa.concat_tables([fs.read_table(f) for f in files], promote_options="permissive")
    if _PART_COL in rows.column_names:
        rows = rows.drop_columns([_PART_COL])
    # a killed run can leave the same row in two work files; they are identical, keep one
    order = pc.index_in(ids, value_set=rows.column(T.CLIP_ID))
    if order.null_count:
        missing = ids.filter(pc.is_null(order)).to_pylist()[:5]
        raise RuntimeError(f"{name}: {order.null_count} row(s) missing from the stage output, e.g. {missing}")
    table = T.conform(rows.take(order), schema)  # exact types and table metadata
    fs.atomic_write_table(with_digest(table, digest, params), output_part)
    return len(ids)


def _warn_if_no_cpu_left(stage: str, resources: Resources, cluster_cpus: float) -> bool:
    """Warn when the model actors would hold every CPU of the cluster: Ray Data's read and write
    tasks (1 CPU each) then never start and the run waits forever. A warning, not an error: an
    autoscaling cluster may add nodes."""
    held = resources.num_cpus * resources.concurrency
    if cluster_cpus and held > cluster_cpus - 1:
        log.warning(
            "%s: %d actor(s) x %.2g CPU = %.2g of the cluster's %.2g CPUs leaves less than 1 CPU for "
            "reading and decoding parts, which then wait forever unless nodes are added: lower "
            "num_cpus or concurrency", stage, resources.concurrency, resources.num_cpus, held, cluster_cpus,
        )
        return True
    return False


def check_parts(stage_cls, parts: Iterable[Path]) -> None:
    """Check every part's schema against the stage's input schema before any work starts."""
    for p in parts:
        stage_cls.check_input(fs.read_schema(p), p.name)


def map_parts(
    stage_cls: type,
    stage_kwargs: dict[str, Any],
    input_dir: str | Path,
    output_dir: str | Path,
    resources: Resources,
    params: str = "",
) -> StageReport:
    """Run a row-wise stage class over every pending input part (see the module docstring).

    `stage_cls(**stage_kwargs)` must be importable by reference and follow `pipeline.stage.Stage`.
    `params` names whatever else the output depends on (`config_params`; quantize's stats id):
    a change in it, or in the stage's output schema, recomputes every part.
    """
    t0 = time.perf_counter()
    input_dir, output_dir = fs.absolute(input_dir), fs.absolute(output_dir)
    parts = fs.list_parts(input_dir)
    with fs.stage_output(stage_cls.name, input_dir, output_dir):
        params = stage_params(stage_cls.output_schema, params)
        parts, digests, _ = plan_parts(input_dir, output_dir, params, stage_cls.name)
        pending = pending_parts(parts, digests, output_dir)
        rows = run_parts(stage_cls, stage_kwargs, pending, digests, output_dir, resources, params=params)
    report = StageReport(stage_cls.name, len(parts), len(parts) - len(pending), rows, time.perf_counter() - t0,
                         status_counts(output_dir))
    log.info("%s", report.line())
    return report


def run_parts(
    stage_cls: type,
    stage_kwargs: dict[str, Any],
    pending: list[Path],
    digests: dict[str, str],
    output_dir: str | Path,
    resources: Resources,
    params: str | None = None,
) -> int:
    """Run a row-wise stage class over these input parts into `output_dir` (same part names),
    each output part recording `digests[name]` and `params`; returns the rows written. With
    `params` and a stage that names `reuse_on`, rows the previous output parts hold under the
    same params are taken from there (`_reuse_previous`)."""
    name = stage_cls.name
    output_dir = fs.location(fs.absolute(output_dir))
    if not fs.is_remote(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
    if not pending:
        log.info("%s: every part already in %s; nothing to do", name, output_dir)
        return 0
    check_parts(stage_cls, pending)
    log.info("%s: %d part(s) to do", name, len(pending))

    ray = _ray()
    quiet_ray_data()
    _warn_if_no_cpu_left(name, resources, ray.cluster_resources().get("CPU", 0.0))
    work_dir = output_dir / WORK_DIR
    tags = {p.name: _work_tag(p.name, digests[p.name]) for p in pending}
    if work_dir.is_dir():  # work of an earlier run for inputs that are not pending any more
        keep = {_part_work_dir(work_dir, t).name for t in tags.values()}
        for d in work_dir.iterdir():
            if d.is_dir() and d.name not in keep:
                fs.rmtree(d)
    reused = written = 0
    if params is not None and getattr(stage_cls, "reuse_on", None):
        calls = [(stage_cls, stage_kwargs, str(p), str(output_dir / p.name), params, str(work_dir), tags[p.name])
                 for p in pending if (output_dir / p.name).exists()]
        got = run_tasks(_reuse_previous, calls, f"{name} (reuse)", num_cpus=0.5, unit="part", show=False)
        reused, written = sum(g[0] for g in got), sum(g[1] for g in got)
        if reused:
            log.info("%s: %d row(s) taken from the previous output (same %s, same settings)", name, reused,
                     ", ".join(stage_cls.reuse_on))
    work_files = readable_work_files(_part_work_dir(work_dir, t) for t in tags.values())
    done_ids = None
    if work_files:
        done_ids = pa.concat_tables([fs.read_table(f, columns=[T.CLIP_ID]) for f in work_files]).column(T.CLIP_ID)
        done_ids = pc.unique(done_ids.combine_chunks())
        if len(done_ids) > written:
            log.info("%s: resuming, %d row(s) already computed by an earlier run", name, len(done_ids) - written)

    counts = {p.name: fs.read_metadata(p).num_rows for p in pending}
    with_rows = [p for p in pending if counts[p.name] > 0]
    storage = fs.storage_state()
    rows_pending = sum(counts.values())
    todo = rows_pending - (len(done_ids) if done_ids is not None else 0)
    if with_rows and todo > 0:
        # about one block per model batch: the progress display moves batch by batch and every
        # actor of the pool gets work even when there are fewer parts than actors
        blocks = max(len(with_rows), min(_MAX_BLOCKS, -(-rows_pending // resources.batch_size)))
        arrow_fs, _ = fs.arrow_filesystem(with_rows[0])
        ds = ray.data.read_parquet([fs.arrow_filesystem(p)[1] for p in with_rows], filesystem=arrow_fs,
                                   include_paths=True, override_num_blocks=blocks)
        prepare = getattr(stage_cls, "prepare", None)
        if prepare is not None:  # decoding in CPU tasks, so the actors only run the model
            ds = ds.map_batches(
                _prepare_batch,
                fn_kwargs={"stage_cls": stage_cls, "stage_kwargs": stage_kwargs, "done_ids": done_ids, "storage": storage},
                batch_size=resources.batch_size,
                batch_format="pyarrow",
                num_cpus=resources.prepare_num_cpus,
                # Ray Data fuses a task step into the actors that follow it when their remote
                # args match, and the decoding would then run in the model actors. max_calls=0
                # is a task's default (a worker is reused without limit); named, it is an arg
                # the actors do not have, so the two never match (checked in tests/pipeline/test_score.py)
                max_calls=0,
            )
        ds = ds.map_batches(
            _StageActor,
            fn_constructor_kwargs={"stage_cls": stage_cls, "stage_kwargs": stage_kwargs, "done_ids": done_ids,
                                   "tags": tags, "work_dir": str(work_dir), "storage": storage},
            batch_size=resources.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resources.concurrency),
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
        )
        _drain(ds, _Progress(name, todo, "row"))

    calls = [(str(p), str(work_dir), tags[p.name], str(output_dir / p.name), stage_cls.output_schema, digests[p.name],
              params) for p in pending]
    rows = sum(run_tasks(_finalize_part, calls, f"{name} (write)", num_cpus=0.5, unit="part", show=False))
    fs.rmtree(work_dir)
    return rows


# --- shape 4: rows through a ray.data.llm processor --------------------------------------------


def _write_batch(batch: pa.Table, folder: str, storage: dict) -> pa.Table:
    """Write one batch of rows as a Parquet file in `folder`; hand back its row count."""
    _use_storage(storage)
    if batch.num_rows:
        fs.atomic_write_table(batch, fs.location(folder) / f"{uuid.uuid4().hex}.parquet")
    return _count(batch.num_rows)


def map_llm(
    read: Callable[..., pa.Table],
    calls: Sequence[tuple],
    expand: Callable[..., list[dict]],
    expand_kwargs: dict[str, Any],
    processor: Callable,
    work_dir: str | Path,
    num_cpus: float,
    desc: str = "llm",
    total: int | None = None,
) -> None:
    """`read(*args)` for each call (light Ray tasks) -> `expand` each row into prompt rows ->
    `processor` (a `ray.data.llm` processor: pipeline.llm.build_processor) -> Parquet files in
    `work_dir`. Each part is read by a plain task with `num_cpus`: Ray Data's own Parquet
    listing task asks for a whole CPU, which a 2-CPU node with an engine holding one cannot give.
    `total` (prompt rows, when known) sizes the progress display.
    """
    if not calls:
        return
    ray = _ray()
    quiet_ray_data()
    light = {"num_cpus": num_cpus}
    task = ray.remote(**light)(_with_storage)
    storage = fs.storage_state()
    ds = ray.data.from_arrow_refs([task.remote(storage, read, *args) for args in calls])
    ds = ds.flat_map(expand, fn_kwargs=expand_kwargs, **light)
    ds = processor(ds).map_batches(_write_batch, fn_kwargs={"folder": str(work_dir), "storage": storage}, batch_size=None,
                                   batch_format="pyarrow", **light)
    _drain(ds, _Progress(desc, total, "answer"))
