"""The analyze stage over Arrow tables (no Ray), one main() run on Ray, the sample's truth columns."""

from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import facts as FX
from pipeline import synth
from pipeline.analyze import AnalyzeConfig, AnalyzeStage
from pipeline.stage import Resources
from schemas import facts as F
from schemas import tables as T

SR = 22050


def _music(seed: int = 0, seconds: float = 4.0) -> np.ndarray:
    track = synth.Track(key=2, minor=False, bpm=110, lead="flute", pad="organ", drums=True)
    return synth.render_track(np.random.default_rng(seed), track, seconds, SR)


def _row(path, status=T.OK, reason="", sr=SR, channels=1, duration=3.0) -> dict:
    return {
        T.CLIP_ID: f"id-{path}", T.AUDIO_PATH: str(path), T.SOURCE_DIGEST: "d", T.START_S: 0.5, T.DURATION_S: duration,
        T.SOURCE_DURATION_S: 4.0, T.SOURCE_SAMPLE_RATE: sr, T.SOURCE_CHANNELS: channels, T.SOURCE_FORMAT: "WAV",
        T.CAPTION_ORIGINAL: "", T.TAGS: [], T.METADATA_JSON: "{}", T.STATUS: status, T.REASON: reason,
    }


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyze")
    x = _music()
    sf.write(d / "mono.wav", x, SR, subtype="PCM_16")
    x44 = np.repeat(x, 2)  # the same 4 s at 44.1 kHz (sample-and-hold)
    sf.write(d / "stereo.flac", np.stack([x44, 0.8 * x44], axis=1), 44100, subtype="PCM_16")
    sf.write(d / "clipped.wav", np.clip(x * 8, -0.5, 0.5), SR, subtype="PCM_16")
    sf.write(d / "silent.wav", np.zeros(4 * SR, np.float32), SR, subtype="PCM_16")
    nan = x.copy()
    nan[2 * SR:2 * SR + 100] = np.nan  # inside the clip (0.5 s to 3.5 s)
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    (d / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense")
    rows = [
        _row(d / "mono.wav"), _row(d / "stereo.flac", sr=44100, channels=2), _row(d / "clipped.wav"),
        _row(d / "silent.wav"), _row(d / "nan.wav"), _row(d / "broken.wav"),
        _row(d / "gone.wav", status=T.ERROR, reason="not decodable audio: x"),
    ]
    return pa.Table.from_pylist(rows, schema=T.CLIPS_SCHEMA)


def test_one_row_out_per_row_in_with_facts_status_and_reason(clips):
    out = AnalyzeStage()(clips)
    assert out.schema == F.FACTS_SCHEMA and out.num_rows == clips.num_rows
    rows = out.to_pylist()
    assert [r[T.CLIP_ID] for r in rows] == clips.column(T.CLIP_ID).to_pylist()
    mono, stereo, clipped, silent, nan, broken, gone = rows
    for r in (mono, stereo, clipped):
        assert r[T.STATUS] == T.OK and r[F.TEMPO_BPM] > 0 and r[F.KEY] in F.KEY_NAMES and r[F.LOUDNESS_LUFS] < 0
    assert mono[F.STEREO_CORRELATION] is None and stereo[F.STEREO_CORRELATION] == pytest.approx(1.0, abs=1e-3)
    assert mono[F.DEFECTS] == [] and F.CLIPPING in clipped[F.DEFECTS]  # flagged, kept
    assert silent[T.STATUS] == T.REJECTED and "silent" in silent[T.REASON]
    assert nan[T.STATUS] == T.REJECTED and "non_finite" in nan[T.REASON]
    assert broken[T.STATUS] == T.ERROR and broken[T.REASON]
    assert gone[T.STATUS] == T.ERROR and gone[T.REASON] == "not decodable audio: x"  # passed through
    for r in (silent, nan, broken, gone):
        assert r[F.TEMPO_BPM] is None and r[F.KEY] == "" and r[F.DEFECTS] == []


def test_reject_defects_turns_a_flag_into_a_rejected_row(clips):
    out = AnalyzeStage(AnalyzeConfig(reject_defects=(F.CLIPPING,)))(clips).to_pylist()
    assert out[2][T.STATUS] == T.REJECTED and out[2][T.REASON] == "defect:clipping"
    assert out[2][F.CLIPPED_FRACTION] > 0  # the facts stay
    assert out[0][T.STATUS] == T.OK


def test_config_and_input_are_checked(clips):
    with pytest.raises(ValueError, match="unknown defect"):
        AnalyzeConfig(reject_defects=("hum",))
    with pytest.raises(T.SchemaError, match="audio_path"):
        AnalyzeStage()(clips.drop_columns([T.AUDIO_PATH]))


def test_sample_keeps_its_rows_and_gains_truth_columns(sample_dir):
    with open(sample_dir / synth.MANIFEST, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 33
    clean = [r for r in rows if r["degradation"] == "none"]
    assert len(clean) == 6 and all(r["bpm"] and r["key"] in F.KEY_NAMES and r["mode"] in ("major", "minor") for r in clean)
    assert {r["degradation"] for r in rows} == {"none", "noise", "clipping", "lowpass", "lowbitrate", "broken"}


def test_wide_sample_lies_where_it_says(tmp_path):
    cfg = synth.SampleConfig(tracks=3, seconds=2.0, seed=3, bad_files=False, wide=True, strengths=("strong", "mild"),
                             wrong_captions=3, solo_share=0.34)
    synth.write_sample(tmp_path, cfg)
    with open(tmp_path / synth.MANIFEST, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * (1 + 4 * 2)
    assert sum(r["solo"] == "1" for r in rows if r["degradation"] == "none") == 1
    lies = {r["caption_lie"] for r in rows}
    assert lies == {"tempo", "key", "drums"}
    from pipeline.factcheck import extract_claims
    for r in rows:
        claims = extract_claims(r["caption"])
        truth_key = F.KEY_NAMES.index(r["key"])
        assert (claims.bpm == float(r["bpm"])) == (r["caption_lie"] != "tempo")
        assert (claims.key == truth_key) == (r["caption_lie"] != "key")
        assert (claims.drums == (r["drums"] == "1")) == (r["caption_lie"] != "drums")


@pytest.mark.slow
def test_main_on_ray_writes_the_facts_table_and_resumes(clips, tmp_path, ray_session):
    from pipeline import analyze, backend

    if not hasattr(backend, "map_parts"):
        pytest.skip("pipeline.backend.map_parts is not there yet")
    src = tmp_path / "clips"
    src.mkdir()
    pq.write_table(clips, src / "part-00000.parquet")
    out = tmp_path / "facts"
    report = analyze.main(AnalyzeConfig(), src, out)
    table = backend.read_folder(out)
    assert table.num_rows == clips.num_rows and report.rows_written == clips.num_rows
    assert set(F.FACT_NAMES) <= set(table.column_names)
    for row in table.to_pylist():  # a list column through Ray and Parquet: 12 shares, or null on a row not measured
        profile = row[F.PITCH_CLASS_PROFILE]
        assert (len(profile) == 12 and abs(sum(profile) - 1) < 1e-9) if row[T.STATUS] == T.OK else profile is None, row[T.REASON]
    assert json.loads((out / analyze.CONFIG_FILE).read_text())["reject_defects"] == []
    again = analyze.main(AnalyzeConfig(), src, out)
    assert again.parts_skipped == 1


@pytest.mark.slow
def test_a_changed_config_recomputes_the_parts_and_a_changed_concurrency_does_not(clips, tmp_path, ray_session):
    import dataclasses

    from pipeline import analyze, backend

    src = tmp_path / "clips"
    src.mkdir()
    pq.write_table(clips, src / "part-00000.parquet")
    out = tmp_path / "facts"
    analyze.main(AnalyzeConfig(), src, out)
    part = out / "part-00000.parquet"
    before = part.read_bytes()
    busier = AnalyzeConfig(resources=dataclasses.replace(AnalyzeConfig().resources, concurrency=2, batch_size=3))
    assert analyze.main(busier, src, out).parts_skipped == 1 and part.read_bytes() == before  # how it runs: same rows
    # a threshold the user changed: the old flags must not stay under the new config
    strict = AnalyzeConfig(thresholds=FX.DefectThresholds(noisy_snr_db=500.0))
    report = analyze.main(strict, src, out)
    assert report.parts_skipped == 0
    rows = pq.read_table(part).to_pylist()
    assert all(F.NOISY in r[F.DEFECTS] for r in rows if r[T.STATUS] == T.OK)
    assert json.loads((out / analyze.CONFIG_FILE).read_text())["thresholds"]["noisy_snr_db"] == 500.0
    rejecting = dataclasses.replace(strict, reject_defects=(F.NOISY,))
    assert analyze.main(rejecting, src, out).parts_skipped == 0
    assert {r[T.REASON] for r in pq.read_table(part).to_pylist() if r[F.LOUDNESS_LUFS] is not None} == {"defect:noisy"}


def test_analyze_params_follow_the_config_and_the_version_of_the_measurements(monkeypatch):
    """A folder analyzed by a mosaiq that measured otherwise (an older FACTS_VERSION, set here
    as the one way to stand for an older release) is measured again, not resumed."""
    from pipeline import analyze

    p0 = analyze.params(AnalyzeConfig())
    assert analyze.params(AnalyzeConfig(resources=Resources(batch_size=3, concurrency=2))) == p0
    assert analyze.params(AnalyzeConfig(thresholds=FX.DefectThresholds(band_limited_hz=24_000.0))) != p0
    monkeypatch.setattr(F, "FACTS_VERSION", F.FACTS_VERSION - 1)
    assert analyze.params(AnalyzeConfig()) != p0


def test_params_follow_what_the_rows_depend_on(tmp_path):
    """Score's and caption's part params change with a model file or a setting that changes the
    rows, and not with how the stage runs."""
    import dataclasses
    import os

    from pipeline import caption, score
    from pipeline.stage import Resources

    model = tmp_path / "w2v"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")
    cfg = score.ScoreConfig(scorer="wav2vec2", model=str(model))
    p0 = score.params(cfg)
    assert score.params(dataclasses.replace(cfg, device="cuda", tf32=False, resources=Resources(batch_size=64, concurrency=4))) == p0
    assert score.params(dataclasses.replace(cfg, scorer="distillmos", model=None)) != p0
    (model / "model.safetensors").write_bytes(b"weights v2")  # replaced in place, same size
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert score.params(cfg) != p0

    cap = caption.CaptionConfig(clap=caption.ClapConfig(backend="none"))
    c0 = caption.caption_params(cap)
    runs = dataclasses.replace(cap, llm=dataclasses.replace(cap.llm, requests_per_second=3.0))
    assert caption.caption_params(runs) == c0
    assert caption.caption_params(dataclasses.replace(cap, llm=dataclasses.replace(cap.llm, num_candidates=7))) != c0
    assert caption.caption_params(dataclasses.replace(cap, append_facts=True)) != c0
    assert caption.caption_params(dataclasses.replace(cap, facts=dataclasses.replace(cap.facts, key_min_confidence=0.9))) != c0
