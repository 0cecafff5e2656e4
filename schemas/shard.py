"""A mosaiq shards folder: the sample JSON beside each audio file in a WebDataset shard
(stable-audio-tools layout), the key pattern, and the files written beside the shards.

A sample is `<key>.flac` + `<key>.json`; keys have no dots. `pipeline/export.py` writes the
folder, `pipeline/verify.py` checks it, `model/` reads it. `mosaiq encode` (model/encode.py,
layout in model/preencoded.py) writes the same folder with `<key>.latent.npy` and
`<key>.text.npy` added to every sample and its `encode_info.json` beside the shards.
"""

from __future__ import annotations

import re

import pyarrow as pa

from schemas import tables as T

SHARD_SAMPLE_VERSION = 1

# --- the shards folder ---------------------------------------------------------------------

SHARD_EXT = ".tar"  # shard-NNNNNN.tar
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,90}\Z")  # sample keys: no dots, no `/`, fit a USTAR name with ext
SIZES_FILE = "sizes.json"  # shard file name -> sample count
INDEX_FILE = "index.parquet"  # clip -> shard, position (INDEX_SCHEMA)
CHECKSUMS_FILE = "SHA256SUMS"  # `sha256sum -c` format
REPORT_FILE = "export_report.json"  # rows left out of the shards and why
CONFIG_FILE = "export_config.json"  # the export's resolved config
STATE_DIR = ".export_state"  # one record per complete shard (plan digest, bytes, sha256): resume

# the index table (index.parquet)
SHARD = "shard"  # shard file name
POSITION = "position"  # sample index inside the shard
INDEX_VERSION = 1
INDEX_SCHEMA = pa.schema(
    [pa.field(T.CLIP_ID, pa.string(), nullable=False), pa.field(SHARD, pa.string(), nullable=False),
     pa.field(POSITION, pa.int32(), nullable=False)],
    metadata={b"mosaiq.table": b"shard_index", b"mosaiq.version": str(INDEX_VERSION).encode()},
)

# --- the sample JSON -----------------------------------------------------------------------

AUDIO_EXT = "flac"
JSON_EXT = "json"
LATENT_EXT = "latent.npy"  # pre-encoded: the unscaled latent (C, T', F')
TEXT_EXT = "text.npy"  # pre-encoded: the text encoder's states (S, E) for the prompt

# --- a pre-encoded folder (`mosaiq encode`) ------------------------------------------------

ENCODE_INFO_FILE = "encode_info.json"  # what encoded the shards (model/preencoded.py)
ENCODE_COMPLETE = "complete"  # its field that is true once every shard is written

# field -> python type(s) it must have in the JSON
PROMPT = "prompt"  # "<quality_prefix>, <caption>": what the trainer conditions on
CAPTION = "caption"
CAPTION_ORIGINAL = "caption_original"
QUALITY_LEVEL = "quality_level"  # 1..5
QUALITY_PREFIX = "quality_prefix"
PMOS = "pmos"
CLAP_SCORE = "clap_score"
SECONDS_START = "seconds_start"
SECONDS_TOTAL = "seconds_total"
SAMPLE_RATE = "sample_rate"
CLIP_ID = "clip_id"
SOURCE = "source"
STATS_ID = "stats_id"
VERSION = "mosaiq_sample_version"

SAMPLE_FIELDS: dict[str, tuple[type, ...]] = {
    PROMPT: (str,),
    CAPTION: (str,),
    CAPTION_ORIGINAL: (str,),
    QUALITY_LEVEL: (int,),
    QUALITY_PREFIX: (str,),
    PMOS: (float, int),
    CLAP_SCORE: (float, int, type(None)),
    SECONDS_START: (float, int),
    SECONDS_TOTAL: (float, int),
    SAMPLE_RATE: (int,),
    CLIP_ID: (str,),
    SOURCE: (str,),
    STATS_ID: (str,),
    VERSION: (int,),
}


def validate_sample_json(obj: dict) -> list[str]:
    """Problems with one sample's JSON (empty list when it is valid)."""
    problems = []
    if not isinstance(obj, dict):
        return [f"sample JSON is {type(obj).__name__}, not an object"]
    for name, types in SAMPLE_FIELDS.items():
        if name not in obj:
            problems.append(f"missing field {name!r}")
        elif isinstance(obj[name], bool) or not isinstance(obj[name], types):
            problems.append(f"field {name!r} is {type(obj[name]).__name__} ({obj[name]!r}), expected {'/'.join(t.__name__ for t in types)}")
    level = obj.get(QUALITY_LEVEL)
    if isinstance(level, int) and not isinstance(level, bool) and not 1 <= level <= 5:
        problems.append(f"field {QUALITY_LEVEL!r} is {level}, expected 1..5")
    return problems
