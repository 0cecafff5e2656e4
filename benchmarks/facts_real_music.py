"""The measured facts on real recorded music: what analyze writes for each clip of a folder.

No truth comes with such files, so this prints what a person checks by ear: for every audio
file under the folder, cut into whole consecutive clips of `schemas.tables.CLIP_SECONDS`, the tempo, key and drums with their confidences and whether each counts as sure
(`FactCheckConfig`), the technical facts and the defect flags, then the share of clips on which
each musical fact is sure and how well the clips of one file agree with each other.

Real recordings the package registries carry (pip sdists; the audio is not committed here):
`demucs` 4.1.0's sdist holds `test.mp3` (a 20 s stereo mix); `basic-pitch` 0.4.0's sdist holds
`tests/resources/vocadito_10.wav` and `vocadito_14.wav` (solo singing, from the Vocadito set).

    python benchmarks/facts_real_music.py FOLDER [--max-clips 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from pipeline import audio
from pipeline import factcheck as FC
from pipeline import facts as FX
from schemas import facts as F
from schemas import tables as T

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif")


def clip_facts(path: Path, max_clips: int) -> list[dict]:
    """The facts of each whole consecutive clip of `path` (one shorter clip for a shorter file)."""
    info = audio.probe(str(path))
    rows = []
    n = int(info.duration_s // T.CLIP_SECONDS)
    length = T.CLIP_SECONDS if n else int(info.duration_s * 100) / 100  # a short file: all of it, to 10 ms
    for i in range(min(max(n, 1), max_clips)):
        start = i * T.CLIP_SECONDS
        wav = audio.load_clip(str(path), start, length, None, mono=False)  # (C, T), native rate
        facts = FX.measure(wav, info.sample_rate)
        facts[F.DEFECTS] = FX.find_defects(facts)
        rows.append({"file": path.name, "start_s": start, **facts})
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None or v != v else format(v, spec)


def report(rows: list[dict], cfg: FC.FactCheckConfig) -> dict:
    print(f"{'file':24s} {'start':>5s}  {'tempo':>6s} {'conf':>5s}  {'key':9s} {'conf':>5s}  {'perc':>7s} {'kick':>7s} {'drums':6s}"
          f"  {'LUFS':>6s} {'bw kHz':>6s} {'SNR':>5s}  defects / sure facts")
    for r in rows:
        c = FC.confident_facts(r, cfg)
        drums = "-" if c.drums is None else "yes" if c.drums else "no"
        print(f"{r['file'][:24]:24s} {r['start_s']:5.1f}  {_fmt(r[F.TEMPO_BPM], '6.1f')} {_fmt(r[F.TEMPO_CONFIDENCE], '5.2f')}"
              f"  {(r[F.KEY] + ' ' + r[F.MODE]):9s} {_fmt(r[F.KEY_CONFIDENCE], '5.2f')}  {_fmt(r[F.PERCUSSIVE_RATIO], '7.4f')}"
              f" {_fmt(r[F.KICK_RATIO], '7.4f')}"
              f" {drums:6s}  {_fmt(r[F.LOUDNESS_LUFS], '6.1f')} {_fmt(r[F.BANDWIDTH_HZ] / 1000, '6.1f')}"
              f" {_fmt(r[F.SNR_DB], '5.1f')}  {','.join(r[F.DEFECTS]) or '-'} / {FC.facts_sentence(r, cfg) or '-'}")
    conf = [FC.confident_facts(r, cfg) for r in rows]
    out = {"clips": len(rows),
           "tempo_sure": float(np.mean([c.tempo_bpm is not None for c in conf])) if rows else float("nan"),
           "key_sure": float(np.mean([c.key is not None for c in conf])) if rows else float("nan"),
           "drums_sure": float(np.mean([c.drums is not None for c in conf])) if rows else float("nan"),
           "flagged": float(np.mean([bool(r[F.DEFECTS]) for r in rows])) if rows else float("nan")}
    print(f"{out['clips']} clips: tempo sure on {out['tempo_sure']:.0%}, key on {out['key_sure']:.0%}, drums on "
          f"{out['drums_sure']:.0%}; {out['flagged']:.0%} flagged with a defect")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder searched recursively for audio files")
    p.add_argument("--max-clips", type=int, default=6, help="clips measured per file, from its start")
    p.add_argument("--json", default=None, help="write every clip's facts and the summary to this file")
    a = p.parse_args(argv)
    files = sorted(f for f in Path(a.folder).rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise SystemExit(f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {a.folder}")
    rows = [r for f in files for r in clip_facts(f, a.max_clips)]
    out = report(rows, FC.FactCheckConfig())
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": out, "clips": rows}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
