"""Formats libsndfile cannot read (AAC and ALAC in .m4a, WMA, bare ADTS AAC), decoded by FFmpeg
through PyAV. The files are written by FFmpeg's own encoders and muxers (PyAV's libavcodec and
libavformat, what `ffmpeg -i in.wav out.m4a` runs), as users' files are."""

import io
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import audio, ingest
from pipeline import facts as FX
from schemas import tables as T

av = pytest.importorskip("av", reason="PyAV (the ffmpeg extra) is not installed")

SR = 44100


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    """(2, T) float32: two tones, a little noise, and clicks that pin the timing."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 587 * t)])
    x += 0.01 * rng.standard_normal(x.shape)
    for at in (0.5, 1.25, 2.0):
        x[:, int(at * SR): int(at * SR) + 30] = 0.9
    return x.astype(np.float32)


def encode(path, x: np.ndarray, codec: str, fmt: str | None = None, options: dict | None = None,
           rate: int = SR, layout: str = "stereo", qscale: int | None = None) -> None:
    """Write (C, T) float32 `x` to a path or file object with FFmpeg's encoder `codec`, frame by
    frame, as ffmpeg does (`qscale`: variable bit rate at that quality, as `ffmpeg -q:a`; else 160 kbit/s)."""
    with av.open(path if isinstance(path, io.IOBase) else str(path), "w", format=fmt, options=options or {}) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        if qscale is not None:
            stream.codec_context.qscale = qscale
            stream.codec_context.flags |= av.codec.context.Flags.qscale
        elif codec != "alac":
            stream.bit_rate = 160_000
        size, fmt_name = stream.codec_context.frame_size or 1024, stream.codec_context.format.name
        for i in range(0, x.shape[1], size):
            block = x[:, i: i + size]
            if fmt_name.startswith("s16"):
                block = np.round(block * 32767).astype(np.int16)
            elif fmt_name.startswith("s32"):
                block = np.round(block.astype(np.float64) * 2147483647).astype(np.int32)
            if not fmt_name.endswith("p"):  # packed: one plane, channels interleaved
                block = block.T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format=fmt_name, layout=layout)
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def test_alac_in_m4a_is_read_sample_exact_from_any_offset(tmp_path):
    x = signal(3.0)
    path = tmp_path / "lossless.m4a"
    encode(path, x, "alac")
    assert audio.probe(path) == audio.Probe(SR, 2, x.shape[1], "FFMPEG:alac")
    for start in (0.0, 0.7, 1.9):
        clip = audio.load_clip(path, start, 1.0, None, mono=False)
        i = int(round(start * SR))
        np.testing.assert_allclose(clip, x[:, i: i + SR], atol=1e-6)
    assert audio.load_clip(path, 0.0, 1.0, 16000).shape == (16000,)  # mono, resampled as every format is


@pytest.mark.parametrize("name, codec, fmt, options", [
    ("aac.m4a", "aac", None, None),
    ("faststart.m4a", "aac", None, {"movflags": "faststart"}),
    ("wma.wma", "wmav2", None, None),
    ("adts.aac", "aac", "adts", None),
])
def test_lossy_files_give_the_same_samples_read_whole_or_from_an_offset(tmp_path, name, codec, fmt, options):
    """A clip read from an offset (a seek to a key frame before a pre-roll, or for coarse
    timestamps counting from the start) holds the samples of the same span read from the
    beginning: exactly where the decoder is deterministic (WMA), within the codec's own error
    where AAC fills bands with seeded noise (PNS) around the clicks. AAC in MP4 is gapless (its
    encoder delay trimmed by the edit list), so the clicks land where they were written."""
    x = signal(3.0)
    path = tmp_path / name
    encode(path, x, codec, fmt, options)
    p = audio.probe(path)
    assert (p.sample_rate, p.channels) == (SR, 2) and abs(p.frames - x.shape[1]) <= 2048
    whole = audio.load_clip(path, 0.0, 2.9, None, mono=False)
    for start in (0.4, 1.3, 1.9):
        i = int(round(start * SR))
        clip, same_span = audio.load_clip(path, start, 1.0, None, mono=False), whole[:, i: i + SR]
        if codec == "wmav2":
            np.testing.assert_array_equal(clip, same_span)
        assert min(np.corrcoef(clip[c], same_span[c])[0, 1] for c in (0, 1)) > 0.999, start
        assert np.sqrt(np.mean((clip - same_span) ** 2)) < 0.01, start  # one sample off, the tones alone differ by 0.016
    if name.endswith(".m4a"):
        assert p.frames == x.shape[1]
        for at in (0.5, 1.25, 2.0):  # each click decodes within a few samples of where it was written
            i = int(at * SR)
            assert abs(int(np.argmax(whole[0, i - 500: i + 500] > 0.6)) - 500) <= 3
        assert np.corrcoef(whole[0], x[0, : whole.shape[1]])[0, 1] > 0.99


def test_bad_ffmpeg_files_become_rows_with_reasons(tmp_path, ingest_to):
    d = tmp_path / "bad"
    d.mkdir()
    x = signal(4.0)
    encode(d / "ok.m4a", x, "aac")
    encode(tmp_path / "fast.m4a", x, "aac", options={"movflags": "faststart"})  # index first, then the audio
    data = (tmp_path / "fast.m4a").read_bytes()
    (d / "cut_faststart.m4a").write_bytes(data[: len(data) // 2])
    data = (d / "ok.m4a").read_bytes()
    (d / "cut.m4a").write_bytes(data[: len(data) // 2])  # the index (at the end) is gone
    sf.write(tmp_path / "m.mp3", x.T, SR, format="MP3")
    (d / "mp3_named.m4a").write_bytes((tmp_path / "m.mp3").read_bytes())
    (d / "text.aac").write_text("not audio")
    (d / "empty.wma").write_bytes(b"")
    rows = {r[T.AUDIO_PATH].rsplit("/", 1)[-1]: r for r in ingest_to(d, tmp_path / "out").to_pylist()}
    expect = {
        "cut_faststart.m4a": (T.ERROR, "truncated: the container declares"),
        "cut.m4a": (T.ERROR, "not decodable audio: Invalid data"),
        "mp3_named.m4a": (T.ERROR, "wrong extension: .m4a file holds mp3 data"),
        "text.aac": (T.ERROR, "not decodable audio"),
        "empty.wma": (T.ERROR, "empty file (0 bytes)"),
        "ok.m4a": (T.OK, ""),
    }
    assert set(rows) == set(expect)
    for name, (status, reason) in expect.items():
        assert rows[name][T.STATUS] == status, (name, rows[name][T.REASON])
        assert reason in rows[name][T.REASON], (name, rows[name][T.REASON])
    assert rows["ok.m4a"][T.SOURCE_SAMPLE_RATE] == SR and rows["ok.m4a"][T.SOURCE_CHANNELS] == 2
    assert rows["ok.m4a"][T.SOURCE_DURATION_S] == pytest.approx(4.0)


def test_without_pyav_an_m4a_is_listed_and_its_row_says_how_to_read_it(tmp_path):
    """PyAV is installed here, so its absence is simulated (the one fake: `import av` made to
    fail in a child process, as it fails where the extra was not installed). A VBR .mp3 without
    a Xing header, which libsndfile would read only in part, says so too."""
    d = tmp_path / "music"
    d.mkdir()
    encode(d / "song.m4a", signal(2.5), "aac")
    encode(tmp_path / "vbr.mp3", loud_start(signal(4.0)), "libmp3lame", options={"write_xing": "0"}, qscale=2)
    chained(tmp_path / "chained.ogg", "VORBIS")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["av"] = None  # `import av` raises ImportError, as without the extra
        from pipeline import audio, ingest
        assert [r.path.rsplit("/", 1)[-1] for r in ingest.scan_folder({str(d)!r})] == ["song.m4a"]
        for path in ({str(d / "song.m4a")!r}, {str(tmp_path / "vbr.mp3")!r}, {str(tmp_path / "chained.ogg")!r}):
            try:
                audio.probe(path)
            except audio.AudioError as e:
                print(e.status, e.reason)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(audio.__file__).parents[1])})
    m4a, mp3, ogg = out.stdout.splitlines()
    assert m4a.startswith("error not decodable audio: .m4a files are decoded by FFmpeg, which is not installed"), m4a
    assert mp3.startswith("error not decodable audio: a VBR .mp3 without a Xing/VBRI header gives no length"), mp3
    assert ogg.startswith("error not decodable audio: an Ogg file of several streams (chained one after another"), ogg
    assert all("pip install 'mosaiq[ffmpeg]'" in line for line in (m4a, mp3, ogg))


def loud_start(x: np.ndarray, seconds: float = 0.3) -> np.ndarray:
    """`x` with loud noise over its start: a VBR encoder's first frames at a high bit rate."""
    y = x.copy()
    n = int(seconds * SR)
    y[:, :n] += 0.5 * np.random.default_rng(1).standard_normal((y.shape[0], n)).astype(np.float32)
    return np.clip(y, -1, 1)


def test_a_vbr_mp3_without_a_xing_header_is_read_whole(tmp_path):
    """An MP3 cutter or a stream dump leaves a VBR file without its Xing/VBRI header, so nothing
    gives its length: libsndfile guesses it from the first frame's bit rate and reads no further
    (here over a second of 8 lost: the rest of a song had no clip, and no row said so), or, where
    the first frames are quiet, past the end (a sound file refused as truncated). Such a file is read
    by FFmpeg to its end; a VBR file with the header, or a CBR one without (whose guess is
    right), stays libsndfile's."""
    x = loud_start(signal(8.0))
    vbr, with_header, cbr = tmp_path / "vbr.mp3", tmp_path / "header.mp3", tmp_path / "cbr.mp3"
    encode(vbr, x, "libmp3lame", options={"write_xing": "0"}, qscale=2)  # as `ffmpeg -q:a 2 -write_xing 0` writes it
    encode(with_header, x, "libmp3lame", qscale=2)
    encode(cbr, x, "libmp3lame", options={"write_xing": "0"})
    assert sf.info(str(vbr)).frames < x.shape[1] - SR  # libsndfile alone: the failure this is about

    p = audio.probe(vbr)
    assert p.format == "FFMPEG:mp3float" and x.shape[1] <= p.frames <= x.shape[1] + 2 * 1152  # + the encoder's delay
    whole = audio.load_clip(vbr, 0.0, 7.9, None, mono=False)
    for start in (1.1, 3.0, 6.5):  # read from an offset: the samples of the same span read whole
        i = int(round(start * SR))
        clip = audio.load_clip(vbr, start, 1.0, None, mono=False)
        assert np.sqrt(np.mean((clip - whole[:, i: i + SR]) ** 2)) < 0.01, start
    for at in (1.25, 2.0):  # the clicks where they were written, after the encoder's delay (no header says it)
        i = int(at * SR)
        assert 0 < int(np.argmax(whole[0, i: i + 3 * 1152] > 0.6)) <= 2 * 1152, at
    assert np.abs(audio.load_clip(vbr, 7.0, 0.9, None)).max() > 0.2  # the end is there: two tones at 0.3
    for path in (with_header, cbr):
        p = audio.probe(path)
        assert p.format == "MP3" and abs(p.frames - x.shape[1]) < 0.25 * SR, (path.name, p)
    vbr.write_bytes(with_header.read_bytes())  # its header written (ffmpeg -c copy): probed afresh, libsndfile's
    assert audio.probe(vbr).format == "MP3"
    # a quiet start (the first frames at a low bit rate): libsndfile's guess runs long, and the
    # file was refused as "truncated: the header declares ... but the end holds none"
    quiet = x.copy()
    quiet[:, : SR // 2] = 0.0
    encode(vbr, quiet, "libmp3lame", options={"write_xing": "0"}, qscale=2)
    assert sf.info(str(vbr)).frames > x.shape[1] + SR
    p = audio.probe(vbr)
    assert p.format == "FFMPEG:mp3float" and x.shape[1] <= p.frames <= x.shape[1] + 2 * 1152


def tone_hz(x: np.ndarray, rate: int) -> float:
    """The frequency of the strongest spectral bin of `x` (one bin per Hz over one second)."""
    return float(np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x))


def _ffmpeg_decode(path) -> np.ndarray:
    """(C, T) float32 as FFmpeg's own decoder gives it (its channel order, WAVE's)."""
    with av.open(str(path)) as f:
        return np.concatenate([frame.to_ndarray() for frame in f.decode(audio=0)], axis=1).astype(np.float32)


@pytest.mark.parametrize("codec", ["vorbis", "opus"])
def test_5_1_ogg_channels_come_in_wave_order_as_ffmpeg_decodes_them(tmp_path, codec):
    """Vorbis and Opus store 5.1 centre second and LFE last (L C R Ls Rs LFE), and libsndfile
    hands the channels over in that order; FFmpeg's decoders, WAVE and FLAC give L R C LFE Ls Rs,
    the order the loudness weighs (LFE left out, surrounds 1.41). Before, a 5.1 .ogg/.opus read
    its centre as R and its LFE as Rs. Each channel carries its own tone: mosaiq's read must put
    each where FFmpeg's decoder does, and measure the same loudness."""
    sr, layout = 48000, ["FL", "FR", "FC", "LFE", "BL", "BR"]
    hz = [330, 440, 550, 50, 660, 770]  # in WAVE order
    t = np.arange(3 * sr) / sr
    x = np.stack([0.2 * np.sin(2 * np.pi * f * t) for f in hz]).astype(np.float32)
    path = tmp_path / f"surround.{'ogg' if codec == 'vorbis' else 'opus'}"
    if codec == "opus":  # as `ffmpeg -i x.wav -c:a libopus x.opus` writes a 5.1 WAVE
        encode(path, x, "libopus", rate=sr, layout="5.1")
    else:  # as oggenc encodes a 5.1 WAVE: reordered to Vorbis's L C R Ls Rs LFE (PyAV has no Vorbis encoder)
        sf.write(path, x[[0, 2, 1, 4, 5, 3]].T, sr, format="OGG", subtype="VORBIS")
    with av.open(str(path)) as f:
        assert [c.name for c in f.streams.audio[0].layout.channels] == layout

    ours, ffmpeg = audio.load_clip(path, 0.5, 2.0, None, mono=False), _ffmpeg_decode(path)
    assert [tone_hz(c[: sr], sr) for c in ffmpeg[:, sr: 2 * sr]] == hz  # the reference reads what was written
    assert [tone_hz(c[: sr], sr) for c in ours] == hz
    assert FX.loudness_lufs(ours, sr) == pytest.approx(FX.loudness_lufs(ffmpeg, sr), abs=0.2)


class _Pipe(io.RawIOBase):
    """A file object that cannot seek, as a pipe: what `ffmpeg ... -f wav - > OUT.wav` writes to."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data += bytes(b)
        return len(b)


@pytest.mark.parametrize("fmt, codec, placeholder", [("wav", "pcm_s16le", b"\xff\xff\xff\xff"), ("aiff", "pcm_s16be", bytes(4))])
def test_a_file_written_to_a_pipe_is_read_whole(tmp_path, fmt, codec, placeholder):
    """A WAV or AIFF written to a pipe (`ffmpeg -i IN -f wav - > OUT.wav`, or a recorder's
    stdout) cannot go back to fill in its lengths: FFmpeg leaves a WAV's RIFF size at 0xFFFFFFFF,
    an AIFF's FORM size at 0. libsndfile reads such a file to its end, as FFmpeg does, but
    mosaiq took the size for a truncation and made the file an error row."""
    x = signal(2.0)
    pipe = _Pipe()
    encode(pipe, x, codec, fmt=fmt)
    assert bytes(pipe.data[4:8]) == placeholder
    piped = tmp_path / f"piped.{fmt}"
    piped.write_bytes(bytes(pipe.data))
    assert audio.probe(piped) == audio.Probe(SR, 2, x.shape[1], fmt.upper())
    np.testing.assert_allclose(audio.load_clip(piped, 0.5, 1.5, None, mono=False), x[:, SR // 2: 2 * SR], atol=1e-4)  # 16 bits


def test_a_truncated_wav_and_one_never_finished_are_rows_that_say_so(tmp_path):
    """A real truncation (the header declares more than the file holds) is still one; a
    recording whose lengths were never written back (0 over audio) is an error row that says
    so and how to mend it (was: "no audio frames")."""
    pipe = _Pipe()
    encode(pipe, signal(2.0), "pcm_s16le", fmt="wav")
    data = bytes(pipe.data)
    at = data.index(b"data")

    def with_sizes(name: str, size: int):
        path = tmp_path / name
        path.write_bytes(data[:4] + struct.pack("<I", size) + data[8: at + 4] + struct.pack("<I", size) + data[at + 8:])
        return path

    with pytest.raises(audio.AudioError, match="truncated: header declares"):
        audio.probe(with_sizes("cut.wav", 2 * (len(data) - at - 8)))  # the header says twice what is there
    with pytest.raises(audio.AudioError, match="empty audio chunk, yet the file holds .* ffmpeg -i IN OUT.wav"):
        audio.probe(with_sizes("unfinished.wav", 0))


def chained(path, subtype: str, seconds: float = 2.0) -> list[float]:
    """A chained Ogg file as `cat a.ogg b.ogg > path` writes it: two streams, one tone each (Hz)."""
    rate, hz = (48000 if subtype == "OPUS" else SR), [440.0, 660.0]
    t = np.arange(int(seconds * rate)) / rate
    links = []
    for i, f in enumerate(hz):
        link = Path(f"{path}.{i}")
        sf.write(link, (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), rate, format="OGG", subtype=subtype)
        links.append(link.read_bytes())
    Path(path).write_bytes(b"".join(links))
    return hz


@pytest.mark.parametrize("subtype, suffix", [("VORBIS", ".ogg"), ("OPUS", ".opus")])
def test_a_chained_ogg_file_is_read_whole(tmp_path, subtype, suffix):
    """A chained Ogg file (a radio stream dump, `cat a.ogg b.ogg`) holds streams one after
    another; libsndfile reads the first and stops, so the second had no clip and no row said
    so. FFmpeg reads every stream; its timestamps start again at each, so the clips are counted
    from the start. A plain Ogg file stays libsndfile's."""
    path = tmp_path / f"chained{suffix}"
    hz = chained(path, subtype)
    alone = audio.probe(f"{path}.0")
    assert alone.format == "OGG" and sf.info(str(path)).frames == alone.frames  # libsndfile alone: the first stream
    p = audio.probe(path)
    assert p.format.startswith("FFMPEG:") and 2 * alone.frames <= p.frames <= 2 * alone.frames + 1024
    rate = p.sample_rate

    assert [tone_hz(audio.load_clip(path, at, 1.0, None), rate) for at in (0.5, 2.5)] == hz  # each stream's tone
