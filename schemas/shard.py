"""The JSON that sits beside each audio file in a mosaiq WebDataset shard (stable-audio-tools layout).

A sample is `<key>.flac` + `<key>.json` (optionally `<key>.latent.npy`); keys have no dots.
"""

from __future__ import annotations

SHARD_SAMPLE_VERSION = 1

AUDIO_EXT = "flac"
JSON_EXT = "json"
LATENT_EXT = "latent.npy"

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
