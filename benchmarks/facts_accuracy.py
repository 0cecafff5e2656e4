"""How right the measured facts are, on generated music whose truth is known.

Writes the bundled sample widened (`SampleConfig(wide=True)`: tempos 60-180, all 24 keys, half
with drums, soft solo tracks over a noise floor, every degradation at two strengths, captions
that lie about tempo, key or drums), measures every clip with `pipeline.facts` exactly as the
analyze stage does (native rate and channels, the first 10.24 s), and prints:

- tempo: within 4 % of the truth; octave errors (half/double) apart; the rest;
- key: exact; relative major/minor, fifth and parallel errors apart;
- drums: the confident decision against the truth, and how many clips it decides (coverage);
- for tempo and key too, the accuracy on the clips where the fact is confident and that coverage;
  for tempo also where its octave is sure, so mosaiq states the BPM (to the LLM, in captions);
- each degradation at each strength: the share flagged with its defect, and the share of
  clean clips flagged at all;
- the caption check: lying captions caught (and abstained on, when the fact lied about is not
  confident), truthful captions wrongly contradicted.

    python benchmarks/facts_accuracy.py [--tracks 32] [--seed 1] [--workers 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from pipeline import audio
from pipeline import facts as FX
from pipeline import factcheck as FC
from pipeline.synth import DEGRADATIONS, MANIFEST, SampleConfig, write_sample
from schemas import facts as F
from schemas import tables as T

DEFECT_OF = {"noise": F.NOISY, "clipping": F.CLIPPING, "lowpass": F.BAND_LIMITED, "lowbitrate": F.BAND_LIMITED}
REASON_OF = {"tempo": F.CONTRADICTS_TEMPO, "key": F.CONTRADICTS_KEY, "drums": F.CONTRADICTS_DRUMS}
TEMPO_TOLERANCE = 0.04


def measure_file(path: str) -> dict:
    wav = audio.load_clip(path, 0.0, T.CLIP_SECONDS, None, mono=False)  # (C, T), native rate
    sr = audio.probe(path).sample_rate
    facts = FX.measure(wav, sr)
    facts[F.DEFECTS] = FX.find_defects(facts)
    return facts


def measure_sample(folder: Path, workers: int) -> pd.DataFrame:
    manifest = pd.read_csv(folder / MANIFEST, dtype=str, keep_default_na=False)
    paths = [str(folder / p) for p in manifest["path"]]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            facts = list(pool.map(measure_file, paths, chunksize=4))
    else:
        facts = [measure_file(p) for p in paths]
    measured = pd.DataFrame(facts).add_prefix("m_")
    return pd.concat([manifest.reset_index(drop=True), measured], axis=1)


def _facts(d: pd.DataFrame) -> list[dict]:
    """Each clip's measured facts, keyed by the column names of `schemas.facts`."""
    return [{k[2:]: v for k, v in r.items() if k.startswith("m_")} for r in d.to_dict("records")]


def _confident(d: pd.DataFrame, cfg: FC.FactCheckConfig) -> list[FC.Confident]:
    return [FC.confident_facts(f, cfg) for f in _facts(d)]


def tempo_table(d: pd.DataFrame, cfg: FC.FactCheckConfig) -> dict:
    ratio = d["m_tempo_bpm"].astype(float) / d["bpm"].astype(float)
    ok = (ratio - 1).abs() <= TEMPO_TOLERANCE
    octave = ((ratio - 2).abs() <= 2 * TEMPO_TOLERANCE) | ((ratio - 0.5).abs() <= TEMPO_TOLERANCE / 2)
    confident = _confident(d, cfg)
    sure = pd.Series([c.tempo_bpm is not None for c in confident], index=d.index)
    stated = pd.Series([c.stated_bpm is not None for c in confident], index=d.index)  # the octave sure too
    return {"n": len(d), "accuracy": ok.mean(), "octave_errors": octave.mean(), "other_errors": 1 - ok.mean() - octave.mean(),
            "coverage": sure.mean(), "accuracy_when_sure": ok[sure].mean() if sure.any() else float("nan"),
            "octave_ok_when_sure": (ok | octave)[sure].mean() if sure.any() else float("nan"),
            "stated": stated.mean(), "accuracy_when_stated": ok[stated].mean() if stated.any() else float("nan")}


def key_table(d: pd.DataFrame, cfg: FC.FactCheckConfig) -> dict:
    truth = d["key"].map(F.KEY_NAMES.index)
    est = d["m_key"].map(F.KEY_NAMES.index)
    same_mode = d["mode"] == d["m_mode"]
    exact = (truth == est) & same_mode
    rel_pc = ((truth + 9) % 12).where(d["mode"] == F.MAJOR, (truth + 3) % 12)  # relative minor / major
    relative = ~same_mode & (est == rel_pc)
    fifth = same_mode & ((est - truth) % 12).isin([5, 7])
    parallel = ~same_mode & (est == truth)
    sure = pd.Series([c.key is not None for c in _confident(d, cfg)], index=d.index)
    return {"n": len(d), "accuracy": exact.mean(), "relative_errors": relative.mean(), "fifth_errors": fifth.mean(),
            "parallel_errors": parallel.mean(), "other_errors": 1 - (exact | relative | fifth | parallel).mean(),
            "coverage": sure.mean(), "accuracy_when_sure": exact[sure].mean() if sure.any() else float("nan")}


def drums_table(d: pd.DataFrame, cfg: FC.FactCheckConfig) -> dict:
    truth = d["drums"] == "1"
    decided = [c.drums for c in _confident(d, cfg)]
    sure = pd.Series([x is not None for x in decided], index=d.index)
    right = pd.Series([x is not None and x == t for x, t in zip(decided, truth)], index=d.index)
    return {"n": len(d), "accuracy_when_sure": right[sure].mean() if sure.any() else float("nan"),
            "coverage": sure.mean(), "accuracy_all": right.mean()}


def defect_table(d: pd.DataFrame) -> list[dict]:
    rows = []
    clean = d[d["degradation"] == "none"]
    flagged = clean["m_defects"].map(len) > 0
    rows.append({"clips": "clean", "n": len(clean), "flagged_right": float("nan"), "flagged_any": flagged.mean(),
                 "which": dict(pd.Series([x for v in clean["m_defects"] for x in v]).value_counts())})
    for kind in DEGRADATIONS:
        for strength in sorted(set(d.loc[d["degradation"] == kind, "strength"])):
            part = d[(d["degradation"] == kind) & (d["strength"] == strength)]
            right = part["m_defects"].map(lambda v, k=kind: DEFECT_OF[k] in v)
            rows.append({"clips": f"{kind} ({strength})", "n": len(part), "flagged_right": right.mean(),
                         "flagged_any": (part["m_defects"].map(len) > 0).mean(), "which": {}})
    return rows


def caption_table(d: pd.DataFrame, cfg: FC.FactCheckConfig) -> dict:
    """Lying originals caught, missed (the lied-about fact was confident and the check let the lie
    through) and abstained on (not caught, that fact not confident); truthful originals wrongly
    contradicted."""
    clean = d[d["degradation"] == "none"]
    confident = _confident(clean, cfg)
    reasons = [FC.check(c, f, cfg) for c, f in zip(clean["caption"], confident)]
    lying = clean["caption_lie"] != ""
    which = {"tempo": lambda c: c.tempo_bpm, "key": lambda c: c.key, "drums": lambda c: c.drums}
    caught, sure = [], []
    for lie, r, c, is_lie in zip(clean["caption_lie"], reasons, confident, lying):
        if is_lie:
            caught.append(REASON_OF[lie] in r)  # a key lie may be refuted by the notes with no key sure
            sure.append(which[lie](c) is not None)
    abstained = [not (x or s) for x, s in zip(caught, sure)]
    checked = [x for x, s in zip(caught, sure) if s]
    false_alarm = [bool(r) for r, is_lie in zip(reasons, lying) if not is_lie]
    by_reason = pd.Series([x for r, is_lie in zip(reasons, lying) if not is_lie for x in r]).value_counts()
    return {"lying": len(caught), "caught": sum(caught) / max(1, len(caught)),
            "abstained": sum(abstained) / max(1, len(caught)),
            "caught_when_sure": sum(checked) / len(checked) if checked else float("nan"),
            "truthful": len(false_alarm), "wrongly_contradicted": sum(false_alarm) / max(1, len(false_alarm)),
            "wrong_reasons": {k: int(v) for k, v in by_reason.items()}}


def pct(x: float) -> str:
    return "  n/a" if x != x else f"{100 * x:5.1f} %"


def report(d: pd.DataFrame, cfg: FC.FactCheckConfig) -> dict:
    clean = d[d["degradation"] == "none"]
    out = {
        "clips": len(d), "tracks": len(clean),
        "tempo_clean": tempo_table(clean, cfg), "tempo_all": tempo_table(d, cfg),
        "key_clean": key_table(clean, cfg), "key_all": key_table(d, cfg),
        "drums_clean": drums_table(clean, cfg), "drums_all": drums_table(d, cfg),
        "defects": defect_table(d), "captions": caption_table(d, cfg),
    }
    print(f"{out['clips']} clips from {out['tracks']} tracks; 'sure': the fact is confident (FactCheckConfig), "
          "coverage: the share of clips where it is")
    for name in ("tempo_clean", "tempo_all"):
        t = out[name]
        print(f"tempo  {name[6:]:5s} n={t['n']:3d}  within 4 %: {pct(t['accuracy'])}  octave errors: {pct(t['octave_errors'])}"
              f"  other: {pct(t['other_errors'])}  (with octaves: {pct(t['accuracy'] + t['octave_errors'])})"
              f"  | sure: coverage {pct(t['coverage'])}, within 4 % {pct(t['accuracy_when_sure'])},"
              f" with octaves {pct(t['octave_ok_when_sure'])} | stated (octave sure): {pct(t['stated'])},"
              f" within 4 % {pct(t['accuracy_when_stated'])}")
    for name in ("key_clean", "key_all"):
        k = out[name]
        print(f"key    {name[4:]:5s} n={k['n']:3d}  exact: {pct(k['accuracy'])}  relative: {pct(k['relative_errors'])}"
              f"  fifth: {pct(k['fifth_errors'])}  parallel: {pct(k['parallel_errors'])}  other: {pct(k['other_errors'])}"
              f"  | sure: coverage {pct(k['coverage'])}, exact {pct(k['accuracy_when_sure'])}")
    for name in ("drums_clean", "drums_all"):
        x = out[name]
        print(f"drums  {name[6:]:5s} n={x['n']:3d}  right when sure: {pct(x['accuracy_when_sure'])}  coverage: {pct(x['coverage'])}"
              f"  right of all: {pct(x['accuracy_all'])}")
    print("defects: share flagged with the right defect / with any defect")
    for r in out["defects"]:
        extra = f"  {r['which']}" if r["which"] else ""
        print(f"  {r['clips']:22s} n={r['n']:3d}  right: {pct(r['flagged_right'])}  any: {pct(r['flagged_any'])}{extra}")
    c = out["captions"]
    print(f"captions: lying originals caught {pct(c['caught'])} of {c['lying']} (abstained {pct(c['abstained'])}: the fact "
          f"lied about was not sure; caught when sure {pct(c['caught_when_sure'])}); truthful originals contradicted "
          f"{pct(c['wrongly_contradicted'])} of {c['truthful']} {c['wrong_reasons'] or ''}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracks", type=int, default=32, help="clean tracks; each adds 8 degraded copies")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--wrong-captions", type=int, default=None, help="lying captions (default: a quarter of the tracks)")
    p.add_argument("--workers", type=int, default=1, help="processes measuring clips")
    p.add_argument("--out", default=None, help="keep the generated sample here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--table", default=None, help="write every clip's truth and facts to this Parquet file")
    a = p.parse_args(argv)
    cfg = SampleConfig(tracks=a.tracks, seed=a.seed, bad_files=False, wide=True, strengths=("strong", "mild"),
                       wrong_captions=a.wrong_captions if a.wrong_captions is not None else max(1, a.tracks // 4))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.out or tmp)
        t0 = time.perf_counter()
        write_sample(folder, cfg)
        t1 = time.perf_counter()
        d = measure_sample(folder, a.workers)
        t2 = time.perf_counter()
    print(f"generated in {t1 - t0:.0f}s, measured in {t2 - t1:.0f}s ({(t2 - t1) / len(d):.2f}s a clip)")
    if a.table:
        d.to_parquet(a.table)
    out = report(d, FC.FactCheckConfig())
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
