"""End to end: `mosaiq curate` on the demo config, on a local Ray, then verify the shards."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline import verify
from pipeline.curate import load_config
from pipeline.backend import read_folder
from schemas import shard as S
from schemas import tables as T

REPO = Path(__file__).resolve().parents[2]
MOSAIQ = Path(sys.executable).parent / "mosaiq"


def run_curate(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MOSAIQ), "curate", "--config", "jobs/demo.yaml", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=2400)


@pytest.mark.slow
def test_demo_curation_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_curate(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for stage in ("ingest", "analyze", "score", "quantize", "caption", "export", "verify"):
        assert f"\n{stage} " in proc.stdout, proc.stdout

    # every input row ends in exactly one row of the last table
    clips = read_folder(out / "clips")
    captions = read_folder(out / "captions")
    assert sorted(captions.column(T.CLIP_ID).to_pylist()) == sorted(clips.column(T.CLIP_ID).to_pylist())
    assert clips.num_rows == 33
    statuses = captions.column(T.STATUS).to_pylist()
    assert statuses.count(T.ERROR) == 3  # the sample's three broken files
    ok = captions.filter(pc.equal(captions.column(T.STATUS), T.OK)).to_pylist()
    for r in ok:
        assert 1 <= r[T.QUALITY_LEVEL] <= 5
        assert r[T.PROMPT] == (f"{r[T.QUALITY_PREFIX]}, {r[T.CAPTION]}" if r[T.QUALITY_PREFIX] else r[T.CAPTION])

    # the shards verify and read with plain webdataset
    result = verify.main(verify.VerifyConfig(shards_dir=str(out / "shards")))
    assert result.ok, result.problems
    assert result.samples == len(ok)
    urls = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == len(ok)
    for s in samples:
        meta = json.loads(s["json"])
        assert s["flac"][:4] == b"fLaC"
        assert not S.validate_sample_json(meta)
        assert meta[S.PROMPT] and 1 <= meta[S.QUALITY_LEVEL] <= 5
    card = (out / "shards" / "README.md").read_text()
    assert "p-MOS" in card and ".png" in card

    # a second run finds every stage done and changes nothing
    before = {p: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    again = run_curate(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in (out / "shards").glob("*.tar")} == before


def test_curate_config_rejects_unknown_stage_and_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [ingest, scoring]\n")
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['scoring'\]"):
        load_config(str(bad))
    bad.write_text("export: {shard_max_cnt: 3}\n")
    with pytest.raises(ValueError, match="shard_max_cnt"):
        load_config(str(bad))
    cfg = load_config(str(REPO / "jobs" / "demo.yaml"))
    assert cfg.caption.clap.backend == "none" and cfg.score.scorer == "distillmos"


def _stamp(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob("part-*.parquet"))}


@pytest.mark.slow
def test_adding_or_changing_a_file_recomputes_only_the_parts_that_changed(tmp_path, ray_session):
    """Resume by content: a re-run after the input changed recomputes exactly the parts whose
    input changed, in every stage, and skips the others (their files are not touched)."""
    import numpy as np
    import soundfile as sf

    from pipeline import curate

    music = tmp_path / "music"
    music.mkdir()
    sr = 16000
    t = np.arange(3 * sr) / sr

    def write(name, f0):
        sf.write(music / name, (0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32), sr)

    for i, name in enumerate("abcdef"):
        write(f"{name}.wav", 220.0 + 40 * i)
    yaml = tmp_path / "job.yaml"
    yaml.write_text(
        f"input: {music}\noutput: {tmp_path / 'out'}\n"
        "stages: [ingest, analyze, score, quantize, caption, export, verify]\n"
        "ingest: {rows_per_part: 2}\n"
        "quantize: {mu: 3.0, sigma: 0.5}\n"  # fixed bands: the stats do not move with the corpus
        "caption: {llm: {num_candidates: 1, max_tokens: 16}, clap: {backend: none}}\n"
        "export: {shard_max_count: 4}\n"
    )
    cfg = load_config(str(yaml))
    first = curate.main(cfg)
    folders = {s: cfg.folder(s) for s in ("ingest", "analyze", "score", "quantize", "caption")}
    before = {s: _stamp(f) for s, f in folders.items()}
    assert all(len(b) == 3 for b in before.values())
    captions_before = {r[T.AUDIO_PATH]: r for r in read_folder(folders["caption"]).to_pylist()}

    write("b.wav", 999.0)  # changed content: its clip lands in part 0
    write("g.wav", 777.0)  # a new file, sorted last: a new part 3
    again = {r.stage: r for r in curate.main(cfg)}
    after = {s: _stamp(f) for s, f in folders.items()}
    four = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    for stage in ("ingest", "analyze", "score"):  # exactly the parts whose input changed
        assert sorted(after[stage]) == four
        for name in ("part-00001.parquet", "part-00002.parquet"):  # untouched: same bytes, not even rewritten
            assert after[stage][name] == before[stage][name], (stage, name)
        assert after[stage]["part-00000.parquet"][1] != before[stage]["part-00000.parquet"][1], stage
    for stage in ("analyze", "score"):
        assert (again[stage].parts_total, again[stage].parts_skipped) == (4, 2), again[stage]
    # quantize: the corpus statistics (count, fit) changed, so its stats id, which every row
    # carries, changed: every part is made again, and caption follows; the LLM is asked only for
    # the two clips it has not answered (its answers are cached by clip and prompt)
    assert (again["quantize"].parts_total, again["quantize"].parts_skipped) == (4, 0)
    runs = sorted((folders["caption"] / "_llm").iterdir(), key=lambda d: (d / "_keys.parquet").stat().st_mtime_ns)
    assert len(runs) == 2
    asked = sorted(Path(p).name for p in pq.read_table(runs[1] / "_keys.parquet").column(T.CLIP_ID).to_pylist())
    new_ids = {r[T.AUDIO_PATH]: r[T.CLIP_ID] for r in read_folder(folders["ingest"]).to_pylist()}
    assert asked == sorted([new_ids[str(music / "b.wav")], new_ids[str(music / "g.wav")]])
    captions = read_folder(folders["caption"])
    for r in captions.to_pylist():
        old = captions_before.get(r[T.AUDIO_PATH])
        if old is not None and r[T.CLIP_ID] == old[T.CLIP_ID]:
            assert r[T.CANDIDATES] == old[T.CANDIDATES]  # the cached answers
    assert captions.num_rows == 7 == read_folder(folders["ingest"]).num_rows
    assert sorted(captions.column(T.CLIP_ID).to_pylist()) == sorted(new_ids.values())
    assert first[-1].stage == "verify" and again["verify"].detail.endswith(": ok")
