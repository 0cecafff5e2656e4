"""The stage contract: what every mosaiq stage declares, with no Ray in it.

A row-wise stage is a callable class:

    class ScoreStage(Stage):
        name = "score"
        input_schema = T.CLIPS_SCHEMA      # the columns it needs
        output_schema = T.SCORES_SCHEMA    # what it writes, one row per input row

        def __init__(self, cfg: ScoreConfig): ...          # loads its model once per worker
        def __call__(self, table: pa.Table) -> pa.Table: ...

        @staticmethod
        def prepare(table: pa.Table, cfg: ScoreConfig) -> pa.Table: ...  # optional: decoding

A stage may define `prepare(table, **same kwargs as __init__)`: CPU work with no model (decoding,
resampling) that adds columns (audio as a `large_list<float32>` column) and may turn rows into
`error`/`rejected` rows. The backend runs it in CPU tasks ahead of the model actors; `__call__`
runs it itself when the prepared columns are absent, so the class works on a bare Arrow table.

Its config dataclass holds a `resources: Resources` field. Each stage module exposes
`main(cfg, input_dir, output_dir) -> StageReport`; `pipeline.backend` runs the class over a
folder of parts on Ray, and the CLI and `curate` start Ray (nothing else does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from schemas import tables as T


@dataclass(frozen=True)
class Resources:
    """How a stage runs on Ray: job config, not code."""

    batch_size: int = 16  # rows per call of the stage
    concurrency: int = 1  # workers (actors) in the pool
    num_cpus: float = 1.0  # per worker
    num_gpus: float = 0.0  # per worker
    prepare_num_cpus: float = 1.0  # per CPU task of the stage's `prepare` step (decoding), if it has one

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus/num_gpus must be >= 0, got {self.num_cpus}/{self.num_gpus}")
        if not self.prepare_num_cpus > 0:
            raise ValueError(f"prepare_num_cpus must be > 0, got {self.prepare_num_cpus}")


@dataclass
class StageReport:
    """What a stage run did: the same shape for every stage, printed by the CLI and `curate`."""

    stage: str
    parts_total: int = 0
    parts_skipped: int = 0  # parts whose output was already there for the same input
    rows_written: int = 0
    seconds: float = 0.0
    status_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    detail: str = ""  # one more line of what the stage found (stats, shards, ...)

    def line(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.status_counts.items()))
        text = (
            f"{self.stage}: {self.parts_total} part(s), {self.parts_skipped} already done, "
            f"{self.rows_written} row(s) written in {self.seconds:.1f}s [{counts}]"
        )
        return f"{text}; {self.detail}" if self.detail else text


class Stage:
    """Base of the row-wise stages: a name, the columns read, the table written."""

    name: ClassVar[str]
    input_schema: ClassVar[pa.Schema]
    output_schema: ClassVar[pa.Schema]
    # the input columns a row's result depends on (with the stage's params): when a part is
    # computed again, its `ok` rows equal in these to an `ok` row of the part's previous output
    # (made under the same params) take that row's result through `reuse` (backend.map_parts);
    # None: every row of a changed part is computed again
    reuse_on: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def reuse(cls, rows: pa.Table, previous: pa.Table, **stage_kwargs) -> pa.Table:  # pragma: no cover - the contract
        """The output rows of `rows` (input rows) given `previous`, the stage's own columns of the
        matching rows of the previous output, aligned with `rows` (null for input rows that are
        not `ok`, which the stage passes through); one out per in."""
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:  # pragma: no cover - the contract
        raise NotImplementedError

    @classmethod
    def check_input(cls, schema: pa.Schema, where: str = "") -> None:
        """Raise `SchemaError` naming every column this stage needs that `schema` lacks."""
        label = f"{cls.name} ({where})" if where else cls.name
        T.require_columns(schema, cls.input_schema.names, label)
