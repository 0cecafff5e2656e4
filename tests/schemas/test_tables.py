import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import facts as F
from schemas import tables as T


def _row(**over):
    r = {
        T.CLIP_ID: "abc", T.AUDIO_PATH: "/x.wav", T.SOURCE_DIGEST: "d", T.START_S: 0.0, T.DURATION_S: 10.24,
        T.SOURCE_DURATION_S: 30.0, T.SOURCE_SAMPLE_RATE: 44100, T.SOURCE_CHANNELS: 2, T.SOURCE_FORMAT: "WAV",
        T.SOURCE_SIZE_BYTES: 1234, T.SOURCE_MTIME_NS: 1_700_000_000_000_000_000,
        T.CAPTION_ORIGINAL: "piano ♪ — “quoted”", T.TAGS: ["a", "b"], T.METADATA_JSON: '{"k": 1}',
        T.STATUS: T.OK, T.REASON: "", T.PMOS: 3.9, T.SCORER: "distillmos", T.QUALITY_LEVEL: 3,
        T.QUALITY_PREFIX: "medium quality", T.STATS_ID: "s1", T.CANDIDATES: ["c1"], T.CANDIDATE_REJECTS: [],
        T.CLAP_ORIGINAL: 0.1, T.CLAP_CANDIDATES: [0.2], T.CLAP_SCORE: 0.2, T.CAPTION: "c1",
        T.CAPTION_SOURCE: "candidate", T.CAPTION_NOTE: "", T.PROMPT: "medium quality, c1",
        T.CAPTION_CONTRADICTS: ["contradicts_tempo"],
        **{name: 0.5 for name in F.FACT_NAMES}, F.KEY: "A", F.MODE: "minor", F.DEFECTS: ["noisy"],
        F.PITCH_CLASS_PROFILE: [1 / 12] * 12,
    }
    r.update(over)
    return r


@pytest.mark.parametrize("name", sorted(T.SCHEMAS))
def test_round_trip_through_parquet(tmp_path, name):
    schema = T.SCHEMAS[name]
    rows = [{k: v for k, v in _row().items() if k in schema.names},
            {k: v for k, v in _row(**{T.STATUS: T.ERROR, T.REASON: "bad", T.PMOS: None}).items() if k in schema.names}]
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.equals(table)
    assert back.schema.metadata[b"mosaiq.table"] == name.encode()
    assert int(back.schema.metadata[b"mosaiq.version"]) >= 1


def test_each_stage_extends_the_previous():
    assert T.SCORES_SCHEMA.names[: len(T.CLIPS_SCHEMA)] == T.CLIPS_SCHEMA.names
    assert T.QUALITY_SCHEMA.names[: len(T.SCORES_SCHEMA)] == T.SCORES_SCHEMA.names
    assert T.CAPTIONS_SCHEMA.names[: len(T.QUALITY_SCHEMA)] == T.QUALITY_SCHEMA.names
    for schema in T.SCHEMAS.values():
        assert T.STATUS in schema.names and T.REASON in schema.names


def test_require_columns_names_what_is_missing():
    table = pa.table({T.CLIP_ID: ["a"]})
    with pytest.raises(T.SchemaError, match=r"score: input is missing column\(s\) \['status'\]"):
        T.require_columns(table, [T.CLIP_ID, T.STATUS], "score")


def test_conform_selects_orders_and_casts():
    rows = [{k: v for k, v in _row().items() if k in T.CLIPS_SCHEMA.names}]
    table = pa.Table.from_pylist(rows)  # inferred types (int64, double, ...), plus an extra column
    table = table.append_column("extra", pa.array([1]))
    out = T.conform(table.select(list(reversed(table.column_names))), T.CLIPS_SCHEMA)
    assert out.schema.equals(T.CLIPS_SCHEMA)
