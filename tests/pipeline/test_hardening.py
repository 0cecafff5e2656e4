"""What a careless or hostile user does, each case a row with a status and a reason (or a clear
refusal), never a lost row or a file let in. One test per row of the hardening table."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from pipeline import audio, fs, ingest, score
from pipeline.backend import read_folder
from pipeline.ingest import IngestConfig
from schemas import tables as T

SR = 16_000


def tone(seconds, sr=SR, f=220.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * f * t) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def by_name(table):
    return {Path(r[T.AUDIO_PATH]).name: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def scorer():
    return score.ScoreStage(score.ScoreConfig())


def test_paths_are_stored_absolute_so_any_working_directory_scores_them(tmp_path, monkeypatch, scorer):
    (tmp_path / "a" / "music").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    sf.write(tmp_path / "a" / "music" / "x.wav", tone(3), SR)
    pd.DataFrame({"path": ["x.wav"]}).to_csv(tmp_path / "a" / "music" / "m.csv", index=False)
    monkeypatch.chdir(tmp_path / "a")
    ingest.main(IngestConfig(), "music/m.csv", "clips", progress=False)  # relative manifest and output
    table = read_folder(tmp_path / "a" / "clips")
    assert table.column(T.AUDIO_PATH).to_pylist() == [str(tmp_path / "a" / "music" / "x.wav")]
    monkeypatch.chdir(tmp_path / "b")  # score runs elsewhere (another node, `ray job submit --working-dir`)
    row = scorer(table).to_pylist()[0]
    assert row[T.STATUS] == T.OK and 1 <= row[T.PMOS] <= 5


def test_audio_changed_or_swapped_after_ingest_is_an_error_not_old_labels(tmp_path, scorer, ingest_to):
    music, elsewhere = tmp_path / "music", tmp_path / "elsewhere"
    music.mkdir()
    elsewhere.mkdir()
    sf.write(music / "edited.wav", tone(3), SR)
    sf.write(music / "real.wav", tone(3, f=330.0), SR)
    sf.write(elsewhere / "other.wav", tone(4, f=440.0), SR)
    (music / "link.wav").symlink_to(music / "real.wav")
    table = ingest_to(music, tmp_path / "clips")
    assert all(r[T.STATUS] == T.OK for r in table.to_pylist() if Path(r[T.AUDIO_PATH]).name != "real.wav")
    sf.write(music / "edited.wav", tone(3, seed=5), SR)  # same length, other content, new mtime
    os.utime(music / "edited.wav", ns=(0, 1_000_000_000))
    (music / "link.wav").unlink()
    (music / "link.wav").symlink_to(elsewhere / "other.wav")  # swapped for a file outside the folder
    rows = by_name(scorer(table))
    for name in ("edited.wav", "link.wav"):
        assert rows[name][T.STATUS] == T.ERROR and rows[name][T.REASON].startswith(T.CHANGED_SINCE_INGEST), rows[name]
        assert rows[name][T.PMOS] is None


def test_manifest_paths_outside_the_folder_are_refused_with_one_message(tmp_path, ingest_to):
    music = tmp_path / "data" / "music"
    music.mkdir(parents=True)
    sf.write(music / "in.wav", tone(3), SR)
    sf.write(tmp_path / "data" / "x.wav", tone(3, f=330.0), SR)  # ../x.wav exists
    sf.write(tmp_path / "y.wav", tone(3, f=440.0), SR)  # an absolute path that exists
    paths = ["in.wav", "../x.wav", str(tmp_path / "y.wav"), "/etc/passwd", "/nonexistent/z.wav", "../../nope.wav"]
    pd.DataFrame({"path": paths}).to_csv(music / "m.csv", index=False)
    rows = ingest_to(music / "m.csv", tmp_path / "clips").to_pylist()
    assert rows[0][T.STATUS] == T.OK
    refused = rows[1:]
    assert all(r[T.STATUS] == T.ERROR for r in refused)
    assert len({r[T.REASON] for r in refused}) == 1 and refused[0][T.REASON].startswith(T.OUTSIDE_ROOTS)
    # the user can widen the roots, or switch confinement off
    wider = ingest_to(music / "m.csv", tmp_path / "c2", IngestConfig(roots=(str(tmp_path / "data"),))).to_pylist()
    assert wider[1][T.STATUS] == T.OK and wider[2][T.REASON].startswith(T.OUTSIDE_ROOTS)
    anywhere = ingest_to(music / "m.csv", tmp_path / "c3", IngestConfig(allow_any_path=True)).to_pylist()
    assert [r[T.STATUS] for r in anywhere[:3]] == [T.OK] * 3 and anywhere[3][T.STATUS] == T.ERROR


def _live_pid() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_two_runs_on_one_folder_the_second_is_refused(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "a.wav", tone(3), SR)
    out = tmp_path / "clips"
    ingest.main(IngestConfig(), music, out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = _live_pid()
    try:  # another run (alive, on this host) holds the folder
        (out / fs.LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": other.pid, "since": "now"}))
        with pytest.raises(fs.FolderError, match=f"being written by another run .*pid {other.pid}"):
            ingest.main(IngestConfig(), music, out, progress=False)
    finally:
        other.kill()
        other.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != fs.LOCK_FILE} == before
    # the lock of a run that is gone is stale: taken over, and released at the end
    ingest.main(IngestConfig(), music, out, progress=False)
    assert not (out / fs.LOCK_FILE).exists()


def test_outputs_pointed_at_another_stage_or_at_the_input_are_refused(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "a.wav", tone(3), SR)
    clips, scores = tmp_path / "clips", tmp_path / "scores"
    ingest.main(IngestConfig(), music, clips, progress=False)
    with fs.stage_output("score", clips, scores):  # what a score run leaves: its marker
        fs.atomic_write_bytes(scores / "part-00000.parquet", (clips / "part-00000.parquet").read_bytes())
    kept = (scores / "part-00000.parquet").read_bytes()
    with pytest.raises(fs.FolderError, match="holds the output of stage 'score'"):
        ingest.main(IngestConfig(), music, scores, progress=False)
    assert (scores / "part-00000.parquet").read_bytes() == kept
    with pytest.raises(fs.FolderError, match="is \\(or holds\\) the stage's input"):
        score.main(score.ScoreConfig(), clips, clips)
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not mosaiq's")
    with pytest.raises(fs.FolderError, match="holds files that mosaiq did not write"):
        ingest.main(IngestConfig(), music, stranger, progress=False)
    assert (stranger / "notes.txt").read_text() == "not mosaiq's"


def test_low_sample_rates_and_endless_files_are_rejected_not_split(tmp_path, ingest_to):
    d = tmp_path / "odd"
    d.mkdir()
    sf.write(d / "one_hz.wav", np.full(3000, 0.1, np.float32), 1)  # 3000 s at 1 Hz, 6 KB
    sf.write(d / "eight_hz.wav", np.full(3000, 0.1, np.float32), 8)
    sf.write(d / "long.wav", tone(40), SR)
    rows = by_name(ingest_to(d, tmp_path / "clips", IngestConfig(max_clips_per_file=3)))
    for name in ("one_hz.wav", "eight_hz.wav"):
        assert rows[name][T.STATUS] == T.REJECTED and rows[name][T.REASON].startswith("sample_rate_too_low"), rows[name]
    assert rows["long.wav"][T.STATUS] == T.REJECTED and rows["long.wav"][T.REASON].startswith("too_many_clips: 4 clips")


def _flac_without_length(path: Path, x: np.ndarray) -> None:
    """A legal FLAC whose STREAMINFO says total_samples = 0 (streamed encoders write that)."""
    sf.write(path, x, SR, format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    at = 8 + 10  # after the block header and the block/frame sizes: rate(20) ch(3) bps(5) total(36)
    word = int.from_bytes(data[at:at + 8], "big")
    data[at:at + 8] = (word & ~((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))


def test_flac_of_unknown_length_is_measured_and_symlink_loops_are_rows(tmp_path, ingest_to):
    d = tmp_path / "music"
    d.mkdir()
    _flac_without_length(d / "stream.flac", tone(12.5))
    (d / "loop_a.wav").symlink_to(d / "loop_b.wav")
    (d / "loop_b.wav").symlink_to(d / "loop_a.wav")
    rows = ingest_to(d, tmp_path / "clips").to_pylist()
    stream = [r for r in rows if r[T.AUDIO_PATH].endswith("stream.flac")]
    assert [r[T.STATUS] for r in stream] == [T.OK, T.OK]  # 10.24 s + 2.26 s
    assert stream[0][T.SOURCE_DURATION_S] == pytest.approx(12.5) and stream[1][T.DURATION_S] == pytest.approx(2.26)
    wave = audio.load_clip(stream[1][T.AUDIO_PATH], stream[1][T.START_S], stream[1][T.DURATION_S], None)
    assert np.allclose(wave, tone(12.5)[int(10.24 * SR):], atol=1e-3)  # read front to back: the right samples
    loops = {Path(r[T.AUDIO_PATH]).name: r for r in rows if "loop" in r[T.AUDIO_PATH]}
    assert sorted(loops) == ["loop_a.wav", "loop_b.wav"]
    assert all(r[T.STATUS] == T.ERROR and "symbolic links" in r[T.REASON] for r in loops.values())


def test_nan_captions_are_empty_and_nested_metadata_is_json(tmp_path, ingest_to):
    sf.write(tmp_path / "a.wav", tone(3), SR)
    sf.write(tmp_path / "b.wav", tone(3, f=300.0), SR)
    pd.DataFrame({"path": ["a.wav", "b.wav"], "caption": [np.nan, "fine"]}).to_csv(tmp_path / "m.csv", index=False)
    assert "NaN" in (tmp_path / "m.csv").read_text() or ",\n" in (tmp_path / "m.csv").read_text()
    (tmp_path / "n.csv").write_text("path,caption\na.wav,NaN\nb.wav,\n")
    rows = ingest_to(tmp_path / "m.csv", tmp_path / "c1").to_pylist() + ingest_to(tmp_path / "n.csv", tmp_path / "c2").to_pylist()
    assert [r[T.CAPTION_ORIGINAL] for r in rows] == ["", "fine", "", ""]
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "a.wav", "album": {"title": "Zoë", "tracks": [1, 2]}}) + "\n")
    row = ingest_to(tmp_path / "m.jsonl", tmp_path / "c3").to_pylist()[0]
    assert json.loads(row[T.METADATA_JSON]) == {"album": {"title": "Zoë", "tracks": [1, 2]}}


def test_a_manifest_with_a_header_and_no_rows_gives_an_empty_table(tmp_path, ingest_to):
    (tmp_path / "m.csv").write_text("path,caption\n")
    table = ingest_to(tmp_path / "m.csv", tmp_path / "clips")
    assert table.num_rows == 0 and table.schema.equals(T.CLIPS_SCHEMA)
    assert [p.name for p in (tmp_path / "clips").glob(fs.PART_GLOB)] == ["part-00000.parquet"]


@pytest.mark.slow
def test_empty_input_flows_through_score_and_quantize(tmp_path, ray_session):
    from pipeline import quantize

    (tmp_path / "m.csv").write_text("path,caption\n")
    ingest.main(IngestConfig(), tmp_path / "m.csv", tmp_path / "clips", progress=False)
    rep = score.main(score.ScoreConfig(), tmp_path / "clips", tmp_path / "scores")
    assert rep.rows_written == 0 and pq.read_table(tmp_path / "scores" / "part-00000.parquet").num_rows == 0
    q = quantize.run(quantize.QuantizeConfig(), tmp_path / "scores", tmp_path / "quality")
    assert q.stats is None and read_folder(tmp_path / "quality").num_rows == 0


@pytest.mark.slow
def test_a_user_error_inside_a_ray_task_is_one_line_with_exit_2(ray_session, capsys):
    from pipeline.cli import run_command

    @ray_session.remote
    def fails():
        raise T.SchemaError("score: input is missing column(s) ['pmos']; it has ['clip_id']")

    rc = run_command("score", lambda argv: ray_session.get(fails.remote()), [])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "missing column(s) ['pmos']" in err and "Traceback" not in err
    assert "mosaiq-last-error.log" in err


def test_check_unchanged_names_what_changed(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1), SR)
    st = (tmp_path / "a.wav").stat()
    audio.check_unchanged(tmp_path / "a.wav", st.st_size, st.st_mtime_ns)
    with pytest.raises(audio.AudioError, match=f"{T.CHANGED_SINCE_INGEST}: size {st.st_size} -> "):
        audio.check_unchanged(tmp_path / "a.wav", st.st_size, st.st_mtime_ns + 1)
    # with ingest's content digest, a new time alone is the same file; new bytes are not
    digest = fs.file_digest(tmp_path / "a.wav")
    audio.check_unchanged(tmp_path / "a.wav", st.st_size, st.st_mtime_ns + 1, digest)
    sf.write(tmp_path / "a.wav", tone(1, seed=3), SR)  # same size, other samples
    with pytest.raises(audio.AudioError, match=f"{T.CHANGED_SINCE_INGEST}: content digest .* is not {digest} "
                                               r"\(same size"):
        audio.check_unchanged(tmp_path / "a.wav", st.st_size, st.st_mtime_ns, digest)


def test_files_touched_or_copied_without_their_times_are_still_used(tmp_path, scorer, ingest_to):
    """A backup restore, `cp` without -p or `touch` changes only the modification time: the
    content digest shows it is the same file, so no stage turns it into an error row; a file
    rewritten after ingest is an error row from analyze on, before any fact is measured."""
    from pipeline.analyze import AnalyzeStage

    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "touched.wav", tone(3), SR)
    sf.write(music / "copied.wav", tone(3, f=330.0), SR)
    sf.write(music / "edited.wav", tone(3, f=440.0), SR)
    table = ingest_to(music, tmp_path / "clips")
    os.utime(music / "touched.wav", ns=(0, 2_000_000_000))
    data = (music / "copied.wav").read_bytes()
    (music / "copied.wav").unlink()
    (music / "copied.wav").write_bytes(data)  # a new file, a new time, the same bytes
    sf.write(music / "edited.wav", tone(3, seed=9), SR)
    scored, analyzed = by_name(scorer(table)), by_name(AnalyzeStage()(table))
    for name in ("touched.wav", "copied.wav"):
        assert scored[name][T.STATUS] == T.OK and 1 <= scored[name][T.PMOS] <= 5, scored[name]
        assert analyzed[name][T.STATUS] == T.OK and analyzed[name]["loudness_lufs"] is not None, analyzed[name]
    for rows in (scored, analyzed):
        assert rows["edited.wav"][T.STATUS] == T.ERROR, rows["edited.wav"]
        assert rows["edited.wav"][T.REASON].startswith(T.CHANGED_SINCE_INGEST)
    assert analyzed["edited.wav"]["loudness_lufs"] is None


def test_export_never_writes_audio_that_changed_since_ingest(tmp_path, make_captions, export_to, in_process_tasks,
                                                             monkeypatch):
    import json as _json

    from pipeline import backend, verify

    captions = make_captions(tmp_path)
    src = tmp_path / "audio" / "src0.wav"
    x, sr = sf.read(src, dtype="float32")
    sf.write(src, np.roll(x, 1000), sr, subtype="PCM_16")  # same length, other audio: swapped content
    monkeypatch.setattr(backend, "run_tasks", in_process_tasks)
    out = tmp_path / "shards"
    export_to(captions, out)
    report = _json.loads((out / "export_report.json").read_text())
    changed = [r for r in report["left_out"]["rows"] if r[T.REASON].startswith(T.CHANGED_SINCE_INGEST)]
    table = read_folder(captions)
    from_src0 = [r for r in table.to_pylist() if r[T.AUDIO_PATH] == str(src) and r[T.STATUS] == T.OK]
    assert from_src0 and sorted(r[T.CLIP_ID] for r in changed) == sorted(r[T.CLIP_ID] for r in from_src0)
    result = verify.main(verify.VerifyConfig(shards_dir=str(out)))
    assert result.ok, result.problems
    keys = {k for k in pq.read_table(out / "index.parquet").column(T.CLIP_ID).to_pylist()}
    assert keys.isdisjoint(r[T.CLIP_ID] for r in from_src0)


def test_a_reused_score_is_not_kept_for_a_file_that_changed_since_ingest(tmp_path, ingest_to):
    """score's reuse path (an earlier p-MOS taken for an unchanged clip) checks the file as the
    decode path does: a file rewritten after ingest is an error row, not the old score."""
    import pyarrow as pa

    music = tmp_path / "music"
    music.mkdir()
    sf.write(music / "same.wav", tone(3), SR)
    sf.write(music / "edited.wav", tone(3, f=330.0), SR)
    rows = ingest_to(music, tmp_path / "clips")
    sf.write(music / "edited.wav", tone(3, seed=4), SR)  # same size, other samples
    previous = pa.table({T.PMOS: [3.5] * rows.num_rows})
    out = by_name(score.ScoreStage.reuse(rows, previous, score.ScoreConfig()))
    assert (out["same.wav"][T.STATUS], out["same.wav"][T.PMOS], out["same.wav"][T.SCORER]) == (T.OK, 3.5, "distillmos")
    assert out["edited.wav"][T.STATUS] == T.ERROR and out["edited.wav"][T.PMOS] is None
    assert out["edited.wav"][T.REASON].startswith(T.CHANGED_SINCE_INGEST)
