"""The one definition of every mosaiq table: column names, units and pyarrow schemas.

Each stage's table is the previous stage's table plus the columns that stage writes, so a
row carries its whole history. Names carry their units (`start_s`, `duration_s`).
Every table has `status` (`ok`, `rejected`, `error`) and `reason` (empty when `ok`).
Bump the version of a table whenever its columns change.
"""

from __future__ import annotations

import pyarrow as pa

from schemas import facts as F

# --- status values ---------------------------------------------------------------------
OK = "ok"
REJECTED = "rejected"
ERROR = "error"
STATUSES = (OK, REJECTED, ERROR)

# --- clip manifest (ingest) ------------------------------------------------------------
CLIP_ID = "clip_id"  # hex digest of (file content digest, start, duration)
AUDIO_PATH = "audio_path"  # absolute path (or URL) of the source file
SOURCE_DIGEST = "source_digest"  # blake2b-128 of the file's bytes ("" when unreadable)
START_S = "start_s"  # clip start in the source, seconds
DURATION_S = "duration_s"  # clip duration, seconds
SOURCE_DURATION_S = "source_duration_s"  # whole file duration, seconds
SOURCE_SAMPLE_RATE = "source_sample_rate"  # native rate, Hz
SOURCE_CHANNELS = "source_channels"
SOURCE_FORMAT = "source_format"  # container as the decoder reports it (WAV, FLAC, ...)
SOURCE_SIZE_BYTES = "source_size_bytes"  # the file's size when ingested (identity check)
SOURCE_MTIME_NS = "source_mtime_ns"  # the file's modification time when ingested, ns (identity check)
CAPTION_ORIGINAL = "caption_original"  # caption as given by the input ("" when missing)
TAGS = "tags"  # list of tags as given by the input
METADATA_JSON = "metadata_json"  # other input columns, as a JSON object string
STATUS = "status"
REASON = "reason"

# --- scores (score) ----------------------------------------------------------------------
PMOS = "pmos"  # pseudo-MOS in [1, 5]
SCORER = "scorer"  # name of the scorer that wrote pmos

# --- quality (quantize) -----------------------------------------------------------------
QUALITY_LEVEL = "quality_level"  # 1..5, empirical-rule bands
QUALITY_PREFIX = "quality_prefix"  # "low quality" / "medium quality" / "high quality" / ""
STATS_ID = "stats_id"  # content id of the quality-stats JSON used

# --- captions (caption) -----------------------------------------------------------------
CANDIDATES = "candidates"  # LLM candidate captions, after validation (kept ones only)
CANDIDATE_REJECTS = "candidate_rejects"  # reasons for LLM outputs that failed validation
CLAP_ORIGINAL = "clap_original"  # CLAP similarity of the original caption
CLAP_CANDIDATES = "clap_candidates"  # CLAP similarity of each kept candidate
CLAP_SCORE = "clap_score"  # CLAP similarity of the chosen caption
CAPTION = "caption"  # the chosen caption
CAPTION_SOURCE = "caption_source"  # "original" or "candidate"
CAPTION_NOTE = "caption_note"  # why the original was kept, e.g. "llm_no_usable_output"
PROMPT = "prompt"  # "<quality_prefix>, <caption>" or just the caption
CAPTION_CONTRADICTS = "caption_contradicts"  # how the original caption contradicts the measured facts

# caption_source values
SOURCE_ORIGINAL = "original"
SOURCE_CANDIDATE = "candidate"
SOURCE_FACTS = "facts"  # no original and no usable candidate: a caption made from measured facts
# caption_note values ("" when a candidate was chosen or the row is not ok)
NOTE_NO_LLM_OUTPUT = "llm_no_usable_output"
NOTE_ORIGINAL_BEST = "original_best"  # no candidate beat the original by the margin
NOTE_UNSCORED = "clap_disabled"  # clap.backend none: candidates kept, original caption used
NOTE_ORIGINAL_CLEANED = "original_cleaned"  # the original caption had markup, control characters or was cut
# reason of a clip whose best caption scores under the CLAP threshold
MISMATCH = "text_audio_mismatch"
NO_CAPTION = "no_caption"  # no original, no usable candidate, nothing confident to say
# candidate_rejects values: why an LLM output did not become a candidate
REJECT_EMPTY = "empty"
REJECT_TOO_SHORT = "too_short"
REJECT_TOO_LONG = "too_long"
REJECT_CHAT_MARKUP = "chat_markup"
REJECT_REFUSAL = "refusal"
REJECT_INSTRUCTIONS = "instructions"
REJECT_ECHO_PROMPT = "echo_prompt"
REJECT_ECHO_ORIGINAL = "echo_original"
REJECT_DUPLICATE = "duplicate"
REJECT_LLM_ERROR = "llm_error"  # the engine or server refused the request (its message is logged)
REJECT_TRUNCATED = "truncated"  # the LLM stopped at max_tokens (finish reason `length`): an unfinished caption
REJECT_THINKING = "thinking"  # a `<think>` block never closed: the budget went to reasoning, no caption
CANDIDATE_REJECT_REASONS = (
    REJECT_EMPTY, REJECT_TOO_SHORT, REJECT_TOO_LONG, REJECT_CHAT_MARKUP, REJECT_REFUSAL, REJECT_INSTRUCTIONS,
    REJECT_ECHO_PROMPT, REJECT_ECHO_ORIGINAL, REJECT_DUPLICATE, REJECT_LLM_ERROR, REJECT_TRUNCATED, REJECT_THINKING,
) + F.CHECK_REASONS  # contradicts_tempo, contradicts_key, contradicts_drums: against the measured facts

NUM_QUALITY_LEVELS = 5
CLIP_SECONDS = 10.24  # QA-MDT's clip length
PMOS_SAMPLE_RATE = 16_000  # what the p-MOS scorers (wav2vec2, DistillMOS) take
CLAP_SAMPLE_RATE = 48_000  # what CLAP takes
SILENCE_DBFS = -60.0
# reasons shared by the stages that decode audio
CHANGED_SINCE_INGEST = "changed since ingest"  # the file is not the one ingest saw
OUTSIDE_ROOTS = "path outside the allowed roots"  # the same words whether or not the file exists  # a clip whose RMS (DC removed) is below this is silent

CLIPS_VERSION = 2  # 2: source_size_bytes, source_mtime_ns
SCORES_VERSION = 3  # 3: the measured facts of analyze (null when it did not run)
QUALITY_VERSION = 3
CAPTIONS_VERSION = 3  # 3: + caption_contradicts

CLIP_FIELDS = [
    pa.field(CLIP_ID, pa.string(), nullable=False),
    pa.field(AUDIO_PATH, pa.string(), nullable=False),
    pa.field(SOURCE_DIGEST, pa.string(), nullable=False),
    pa.field(START_S, pa.float64(), nullable=False),
    pa.field(DURATION_S, pa.float64(), nullable=False),
    pa.field(SOURCE_DURATION_S, pa.float64()),
    pa.field(SOURCE_SAMPLE_RATE, pa.int32()),
    pa.field(SOURCE_CHANNELS, pa.int32()),
    pa.field(SOURCE_FORMAT, pa.string()),
    pa.field(SOURCE_SIZE_BYTES, pa.int64()),
    pa.field(SOURCE_MTIME_NS, pa.int64()),
    pa.field(CAPTION_ORIGINAL, pa.string(), nullable=False),
    pa.field(TAGS, pa.list_(pa.string()), nullable=False),
    pa.field(METADATA_JSON, pa.string(), nullable=False),
    pa.field(STATUS, pa.string(), nullable=False),
    pa.field(REASON, pa.string(), nullable=False),
]

SCORE_FIELDS = [
    pa.field(PMOS, pa.float64()),
    pa.field(SCORER, pa.string(), nullable=False),
]

QUALITY_FIELDS = [
    pa.field(QUALITY_LEVEL, pa.int8()),
    pa.field(QUALITY_PREFIX, pa.string(), nullable=False),
    pa.field(STATS_ID, pa.string(), nullable=False),
]

CAPTION_FIELDS = [
    pa.field(CANDIDATES, pa.list_(pa.string()), nullable=False),
    pa.field(CANDIDATE_REJECTS, pa.list_(pa.string()), nullable=False),
    pa.field(CLAP_ORIGINAL, pa.float64()),
    pa.field(CLAP_CANDIDATES, pa.list_(pa.float64()), nullable=False),
    pa.field(CLAP_SCORE, pa.float64()),
    pa.field(CAPTION, pa.string(), nullable=False),
    pa.field(CAPTION_SOURCE, pa.string(), nullable=False),
    pa.field(CAPTION_NOTE, pa.string(), nullable=False),
    pa.field(PROMPT, pa.string(), nullable=False),
    pa.field(CAPTION_CONTRADICTS, pa.list_(pa.string()), nullable=False),
]


def _schema(fields: list[pa.Field], name: str, version: int) -> pa.Schema:
    return pa.schema(fields, metadata={b"mosaiq.table": name.encode(), b"mosaiq.version": str(version).encode()})


# every table after analyze carries the measured facts (schemas/facts.py)
FACT_FIELDS = F.FACT_FIELDS
CLIPS_SCHEMA = _schema(CLIP_FIELDS, "clips", CLIPS_VERSION)
FACTS_SCHEMA = _schema(CLIP_FIELDS + FACT_FIELDS, "facts", F.FACTS_VERSION)
SCORES_SCHEMA = _schema(CLIP_FIELDS + FACT_FIELDS + SCORE_FIELDS, "scores", SCORES_VERSION)
QUALITY_SCHEMA = _schema(CLIP_FIELDS + FACT_FIELDS + SCORE_FIELDS + QUALITY_FIELDS, "quality", QUALITY_VERSION)
CAPTIONS_SCHEMA = _schema(
    CLIP_FIELDS + FACT_FIELDS + SCORE_FIELDS + QUALITY_FIELDS + CAPTION_FIELDS, "captions", CAPTIONS_VERSION
)

# caption's internal work table: the quality table plus the validated LLM candidates
CANDIDATES_SCHEMA = _schema(
    CLIP_FIELDS + FACT_FIELDS + SCORE_FIELDS + QUALITY_FIELDS
    + [f for f in CAPTION_FIELDS if f.name in (CANDIDATES, CANDIDATE_REJECTS)],
    "caption_candidates", 1,
)

SCHEMAS = {"clips": CLIPS_SCHEMA, "facts": FACTS_SCHEMA, "scores": SCORES_SCHEMA, "quality": QUALITY_SCHEMA, "captions": CAPTIONS_SCHEMA}


class SchemaError(ValueError):
    """A table does not have the columns a stage needs."""


def require_columns(table: pa.Table | pa.Schema, columns, stage: str) -> None:
    """Raise naming every column that `stage` needs and `table` lacks."""
    names = set(table.schema.names if isinstance(table, pa.Table) else table.names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise SchemaError(f"{stage}: input is missing column(s) {missing}; it has {sorted(names)}")


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns to `schema` (in its order), raising on missing ones."""
    require_columns(table, schema.names, f"table {schema.metadata.get(b'mosaiq.table', b'?').decode()}")
    arrays = [table.column(f.name).cast(f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _blank(f: pa.Field):
    """Null, or the empty value of a column that cannot be null ([], "", 0)."""
    if f.nullable:
        return None
    if pa.types.is_list(f.type):
        return []
    return "" if pa.types.is_string(f.type) else 0


def blank_row(schema: pa.Schema) -> dict:
    """A row of `schema` with nothing in it: null, or "" and [] where a column cannot be null
    (the starting point of a row built by hand, e.g. in tests and benchmarks)."""
    return {f.name: _blank(f) for f in schema}


def with_facts(table: pa.Table) -> pa.Table:
    """The clip columns and the measured facts of `table` (FACTS_SCHEMA); facts a table does not
    have (analyze did not run) are null, or "" and [] where a column cannot be null."""
    n = table.num_rows
    arrays = []
    for f in FACTS_SCHEMA:
        if f.name in table.column_names:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.array([_blank(f)] * n, f.type))
    require_columns(table, CLIPS_SCHEMA.names, "facts")
    return pa.Table.from_arrays(arrays, schema=FACTS_SCHEMA)


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
