"""The one Ray backend: every stage runs on Ray through the three shapes here, and no stage
module imports `ray`.

- `map_parts`: run a row-wise stage class (`pipeline.stage.Stage`) over a folder of Parquet
  parts with Ray Data, resumably (score, quantize's pass 2, caption's CLAP step, ...).
- `run_tasks`: run independent tasks (one function, many argument tuples) with a progress
  display, results in order (export's shards, caption's per-part steps).
- `aggregate_parts`: one partial per part computed where the part is, merged on the driver in a
  canonical order (quantize's moments and report).
- `map_llm`: stream the rows of some parts through a `ray.data.llm` processor into a work folder
  (caption's LLM step).

How `map_parts` goes:
1. Output part `p` holds exactly the rows of input part `p`, in the same order. It records in
   its Parquet metadata the digest of the input part it was made from (and of the stage's
   `params`); a part whose output exists with the same digest is skipped, any other is
   computed again (resume by content, not by name). Output parts with no input part any more
   are removed.
2. The rows of the pending parts stream through `map_batches` with the stage class (loaded once
   per actor), and Ray Data writes the results to `<output>/_work/`, one folder per part and
   input digest. Rows already there from a killed run are not computed again.
3. One Ray task per pending part gathers that part's rows from `_work/`, puts them in input
   order, checks the count, and writes the output part atomically.
4. `_work/` is removed once every part is final.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import fs
from pipeline.stage import Resources, StageReport
from schemas import tables as T

log = logging.getLogger(__name__)

WORK_DIR = "_work"
INPUT_DIGEST_KEY = b"mosaiq.input_digest"  # output part metadata: what it was made from
_PART_COL = "__mosaiq_part"  # which input part (and digest) a row came from (work files only)
_RAY_PATH_COL = "path"  # what read_parquet(include_paths=True) adds
_MAX_BLOCKS = 20_000


# --- small helpers every shape uses ----------------------------------------------------------


def _ray():
    import ray

    return ray


def read_folder(folder: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read every part of a stage folder (tests, reports and small tables only)."""
    return pa.concat_tables([pq.read_table(p, columns=columns) for p in fs.list_parts(folder)])


def status_counts(folder: str | Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in fs.list_parts(folder):
        vc = pc.value_counts(pq.read_table(p, columns=[T.STATUS]).column(T.STATUS))
        for item in vc.to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


class _Progress:
    """A progress bar on a terminal, a log line at most every `every_s` seconds otherwise."""

    def __init__(self, desc: str, total: int, unit: str, every_s: float = 60.0):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.n, self.t0, self.last = 0, time.perf_counter(), time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            return
        now = time.perf_counter()
        if self.n == self.total or now - self.last >= self.every_s:
            self.last = now
            log.info("%s: %d/%d %s(s) done (%.1fs)", self.desc, self.n, self.total, self.unit, now - self.t0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- shape 2: independent tasks --------------------------------------------------------------


def run_tasks(
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    desc: str,
    num_cpus: float = 1.0,
    max_retries: int = 0,
    unit: str = "task",
) -> list[Any]:
    """Run `fn(*args)` for every `args` in `calls` as Ray tasks; results in the order of `calls`.

    `fn` must be importable (a module-level function), so Ray pickles it by reference.
    """
    if not calls:
        return []
    ray = _ray()
    task = ray.remote(num_cpus=num_cpus, max_retries=max_retries)(fn)
    refs = [task.remote(*args) for args in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    progress = _Progress(desc, len(refs), unit)
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[index[ref]] = ray.get(ref)
                progress.update()
    finally:
        progress.close()
    return results


# --- shape 3: per-part partials --------------------------------------------------------------


def _partial_of_part(partial: Callable[[pa.Table], Any], part: str, columns: list[str] | None) -> Any:
    return partial(pq.read_table(part, columns=columns))


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
    return combine(run_tasks(_partial_of_part, calls, desc, num_cpus=num_cpus, unit="part"))
