"""Audio I/O: probe a file without decoding it all, decode one clip, check its samples.

Decoding goes through `soundfile` (libsndfile: wav, flac, ogg/vorbis/opus, mp3, aiff, ...),
which needs no FFmpeg; what libsndfile cannot read (AAC/ALAC in .m4a, WMA, WebM, ...) goes
through FFmpeg as PyAV ships it (`pipeline.ffmpeg`, the optional `ffmpeg` extra). Resampling
is torchaudio's (pure Python, works on the CPU torch).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from pipeline import fs
from schemas import tables as T

SNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")
# decoded by FFmpeg (pipeline/ffmpeg.py); listed by a scan with or without it, so a file mosaiq
# cannot read is an error row that says so, never silently left out
FFMPEG_EXTENSIONS = (".m4a", ".mp4", ".aac", ".wma", ".webm", ".mka", ".ac3", ".wv", ".ape", ".amr")
AUDIO_EXTENSIONS = SNDFILE_EXTENSIONS + FFMPEG_EXTENSIONS

# the container each extension should hold, as libsndfile names it (sf.info().format)
_EXPECTED_FORMAT = {
    ".wav": {"WAV", "WAVEX", "RF64"},
    ".flac": {"FLAC"},
    ".ogg": {"OGG"},
    ".oga": {"OGG"},
    ".opus": {"OGG"},
    ".mp3": {"MP3"},
    ".aif": {"AIFF"},
    ".aiff": {"AIFF"},
    ".au": {"AU"},
    ".w64": {"W64"},
    ".caf": {"CAF"},
}

_SHOULD_BE = re.compile(r"^(data|RIFF|SSND|FORM)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# a chunk size this large is a writer's "length unknown" placeholder, not a length: FFmpeg writing
# a WAV to a pipe leaves 0xFFFFFFFF (an AIFF 0), other recorders values near 2**31; libsndfile then
# reads to the end of the file, as FFmpeg does
_UNKNOWN_SIZE = 0x7FFFF000
_EMPTY_DATA = re.compile(r"^(data|SSND)\s*:\s*0\s*$", re.MULTILINE)
_HEADER_BYTES = 4096  # more than a WAV/AIFF header with its metadata chunks usually takes
_LENGTH_SLACK_S = 0.25  # how far a lossy header's frame count may overstate the real length
UNKNOWN_FRAMES = 1 << 62  # libsndfile's frame count for a stream of unknown length is about 2**63


class AudioError(Exception):
    """A file or clip that cannot be used; the message is the row's reason."""

    def __init__(self, reason: str, status: str = "error"):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Probe:
    sample_rate: int
    channels: int
    frames: int
    format: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str | Path) -> Probe:
    """Read the header, check the extension matches the content, check the end is readable.

    Raises AudioError with the decoder's reason for zero-byte, non-audio, mislabelled and
    truncated files. Only the last few frames are decoded.
    """
    path = fs.location(path)
    try:
        size = fs.size_and_mtime(path)[0]
    except OSError as e:
        raise AudioError(f"unreadable: {e.strerror or e}") from e
    if size == 0:
        raise AudioError("empty file (0 bytes)")
    if path.name.startswith("._") and _appledouble(path):
        raise AudioError(f"not audio: a macOS AppleDouble file, the metadata Finder writes beside "
                         f"{path.name[2:]!r} on a disk that is not a Mac's (delete them: dot_clean, or find . -name '._*' -delete)")
    if _by_ffmpeg(path, fresh=True):
        from pipeline import ffmpeg

        return Probe(*ffmpeg.probe(path))
    if (short := _sndfile_falls_short(path)) is not None:  # and no PyAV to read it whole
        raise AudioError(f"not decodable audio: {short}")
    try:
        with open_sound(path) as f:
            info = _Info(f)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"not decodable audio: {_decoder_message(e)}") from e
    expected = _EXPECTED_FORMAT.get(path.suffix.lower())
    if expected is not None and info.format not in expected:
        raise AudioError(f"wrong extension: {path.suffix} file holds {info.format} audio")
    for m in _SHOULD_BE.finditer(info.extra_info or ""):
        if int(m.group(3)) < int(m.group(2)) < _UNKNOWN_SIZE:  # less than declared (a smaller size: a pipe's 0, or junk after)
            raise AudioError(f"truncated: header declares {m.group(1)} chunk of {m.group(2)} bytes, file holds {m.group(3)}")
    frames = info.frames
    if frames == 0 and _EMPTY_DATA.search(info.extra_info or "") and size > _HEADER_BYTES:
        raise AudioError(f"no audio frames: the header declares an empty audio chunk, yet the file holds {size} bytes "
                         f"(a recording whose header was never written back?): rewrite it: ffmpeg -i IN OUT.wav")
    if info.format == "FLAC" and info.samplerate > 0 and not 0 < frames < UNKNOWN_FRAMES:
        # a legal FLAC may leave its length unknown (total_samples = 0): libsndfile then
        # reports 0 or SF_COUNT_MAX frames, so the stream is decoded to measure it
        frames = _count_frames(path)  # decoded to its end: no tail to check
        if frames > 0 and info.channels > 0:
            return Probe(int(info.samplerate), int(info.channels), int(frames), str(info.format))
    if frames <= 0 or info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(f"no audio frames (frames={frames}, rate={info.samplerate}, channels={info.channels})")
    try:  # lossy headers only estimate the length (MP3: by up to ~0.1 s), so read the last second
        with open_sound(path) as f:
            f.seek(max(0, frames - info.samplerate))
            tail = f.read(info.samplerate, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"truncated: cannot read the end of the stream: {_decoder_message(e)}") from e
    if len(tail) == 0:
        raise AudioError(f"truncated: the header declares {frames} frames but the end holds none")
    return Probe(int(info.samplerate), int(info.channels), int(frames), str(info.format))


_APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"


def _appledouble(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == _APPLEDOUBLE_MAGIC
    except Exception:  # noqa: BLE001 - unreadable: the decoder says why
        return False


def _by_ffmpeg(path, fresh: bool = False) -> bool:
    p = fs.location(path)
    return p.suffix.lower() in FFMPEG_EXTENSIONS or (_sndfile_falls_short(p, fresh) is not None and _have_pyav())


_FALLS_SHORT: dict[str, str | None] = {}  # by location: measured by probe, reused by every clip read after it


def _sndfile_falls_short(p: Path, fresh: bool = False) -> str | None:
    """Why libsndfile would read only part of this file, which FFmpeg reads whole (None: it reads
    it all). Measured again when `fresh` (probe: the file may have changed since it was last
    read here; a clip read after a change is refused by `check_unchanged` first)."""
    check = _SHORT_READS.get(p.suffix.lower())
    if check is None:
        return None
    key = str(p)
    if fresh or key not in _FALLS_SHORT:
        if len(_FALLS_SHORT) > 4096:
            _FALLS_SHORT.clear()
        try:
            _FALLS_SHORT[key] = check(p)
        except Exception:  # noqa: BLE001 - unreadable (store clients raise their own types): the decoder says why
            return None
    return _FALLS_SHORT[key]


def _have_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


# MPEG audio Layer III frame headers (ISO/IEC 11172-3, 13818-3): kbit/s by bit-rate index for
# MPEG-1 and MPEG-2/2.5, sample rates by index for each version (3: MPEG-1, 2: MPEG-2, 0: 2.5)
_MP3_KBPS = {3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
             2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
_MP3_LENGTH_TAGS = (b"Xing", b"Info", b"VBRI")  # the first frame's header of an encoder that wrote the length
_WINDOW = 16 << 10  # bytes read where frames (or Ogg pages) are looked for


def _mp3_frame(b: bytes, i: int) -> tuple[int, int] | None:
    """(bit-rate index, frame length in bytes) of a Layer III frame header at b[i:], else None."""
    if i + 4 > len(b) or b[i] != 0xFF or b[i + 1] & 0xE0 != 0xE0:
        return None
    version, layer, kbps_i, rate_i = (b[i + 1] >> 3) & 3, (b[i + 1] >> 1) & 3, b[i + 2] >> 4, (b[i + 2] >> 2) & 3
    if version == 1 or layer != 1 or kbps_i in (0, 15) or rate_i == 3:
        return None
    kbps, rate = _MP3_KBPS[3 if version == 3 else 2][kbps_i], _MP3_RATES[version][rate_i]
    return kbps_i, (144 if version == 3 else 72) * kbps * 1000 // rate + ((b[i + 2] >> 1) & 1)


def _mp3_frames_in(b: bytes, run: int = 3) -> list[tuple[int, int]]:
    """(offset, bit-rate index) of the frames of the first run of `run` headers in `b` that each
    follow the last at its length (a lone 0xFFE in the data is no frame), and the frames after."""
    for i in range(len(b) - 3):
        frames, j = [], i
        while (h := _mp3_frame(b, j)) is not None:
            frames.append((j, h[0]))
            j += h[1]
        if len(frames) >= run:
            return frames
    return []


def _mp3_length_guessed(p: Path) -> str | None:
    """A VBR MP3 whose first frame holds no Xing/Info/VBRI header: libsndfile (mpg123) guesses its
    length from the first frame's bit rate and reads no further (a 30 s file read as 9 s, the
    rest lost). A CBR file's guess is right to a frame or two."""
    with p.open("rb") as f:
        head = f.read(10)
        start = 0
        if head[:3] == b"ID3" and len(head) == 10:  # ID3v2: a syncsafe size, a footer when flagged
            start = 10 + sum((head[6 + k] & 0x7F) << (7 * (3 - k)) for k in range(4)) + (10 if head[5] & 0x10 else 0)
        f.seek(start)
        window = f.read(_WINDOW)
        first = _mp3_frames_in(window)
        if not first or any(tag in window[first[0][0]: first[1][0]] for tag in _MP3_LENGTH_TAGS):
            return None
        size = f.seek(0, 2)
        rates = {kbps_i for _, kbps_i in first}
        for share in (0.25, 0.5, 0.75):  # CBR: every frame at the first one's bit rate
            f.seek(start + int(share * (size - start)))
            rates |= {kbps_i for _, kbps_i in _mp3_frames_in(f.read(_WINDOW))}
    if len(rates) == 1:
        return None
    return ("a VBR .mp3 without a Xing/VBRI header gives no length, and libsndfile reads only as far as it guesses "
            "from the first frame: pip install 'mosaiq[ffmpeg]' to read it whole, or write the header: "
            "ffmpeg -i IN.mp3 -c copy OUT.mp3")


def _ogg_chained(p: Path) -> str | None:
    """A chained Ogg file (streams one after another, as a radio stream dump or `cat a.ogg b.ogg`
    writes): libsndfile reads the first stream and stops. Its last page belongs to another
    stream (serial number) than its first."""
    with p.open("rb") as f:
        first = f.read(27)
        f.seek(max(0, f.seek(0, 2) - _WINDOW))
        tail = f.read(_WINDOW)
    last = tail.rfind(b"OggS\x00")
    if first[:5] != b"OggS\x00" or last < 0 or last + 18 > len(tail) or tail[last + 14: last + 18] == first[14:18]:
        return None
    return ("an Ogg file of several streams (chained one after another, or multiplexed), of which libsndfile "
            "reads only the first: pip install 'mosaiq[ffmpeg]' to read it whole, or convert it: ffmpeg -i IN OUT.flac")


_SHORT_READS = {".mp3": _mp3_length_guessed, ".ogg": _ogg_chained, ".oga": _ogg_chained, ".opus": _ogg_chained}


class _Info:
    """What `soundfile.info` reports, read from an open file (a local path or an object)."""

    def __init__(self, f: sf.SoundFile):
        self.samplerate, self.channels, self.frames = f.samplerate, f.channels, f.frames
        self.format, self.extra_info = f.format, f.extra_info


@contextlib.contextmanager
def open_sound(path) -> Iterator[sf.SoundFile]:
    """A `soundfile.SoundFile` on a local file (by name) or on an object in object storage
    (through its fsspec file, read in ranges). A failure of the store (the object vanished, the
    connection dropped) raises OSError, as a bad local file does."""
    p = fs.location(path)
    if not fs.is_remote(p):
        with sf.SoundFile(str(p)) as f:
            yield f
        return
    try:
        handle = p.open("rb")
    except OSError:
        raise  # FileNotFoundError, PermissionError: the row's reason as on disk
    except Exception as e:  # noqa: BLE001 - store clients raise their own types
        raise OSError(f"cannot open {str(p)!r}: {type(e).__name__}: {e}") from e
    with handle, sf.SoundFile(handle) as f:
        yield f


def _count_frames(path: Path) -> int:
    """Decode a stream whose header gives no length, counting its frames (block by block)."""
    try:
        with open_sound(path) as f:
            return len(read_sequential(f, 0, None))
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"not decodable audio: {_decoder_message(e)}") from e


def _unknown_length(f: sf.SoundFile) -> bool:
    return f.format == "FLAC" and not 0 < f.frames < UNKNOWN_FRAMES


def span_of(block: np.ndarray, first: int, start: int, n: int | None) -> np.ndarray | None:
    """The part of a decoded (T, C) `block` whose first frame is frame `first` of the stream that
    falls in frames [start, start + n) (n None: to the end); None when none does."""
    lo, hi = max(start - first, 0), len(block) if n is None else min(len(block), start + n - first)
    return block[lo:hi] if hi > lo else None


def read_sequential(f: sf.SoundFile, start: int, n: int | None, block: int = 1 << 16,
                    max_frames: int | None = None) -> np.ndarray:
    """Frames [start, start + n) (n None: to the end) of a stream libsndfile cannot seek in (a
    FLAC of unknown length), read front to back. (T, C) float32. AudioError (`rejected`) as soon
    as more than `max_frames` frames were read, so a hostile stream is never decoded in full."""
    f.seekable = lambda: False  # soundfile seeks after every read when it thinks it can: it cannot here
    pos, out = 0, []
    while n is None or pos < start + n:
        data = f.read(block, dtype="float32", always_2d=True)
        if not len(data):
            break
        if max_frames is not None and pos + len(data) > max_frames:
            raise AudioError(f"too_long: more than {max_frames} frames at {f.samplerate} Hz", T.REJECTED)
        if (part := span_of(data, pos, start, n)) is not None:
            out.append(part)
        pos += len(data)
    return np.concatenate(out) if out else np.zeros((0, f.channels), np.float32)


# (path, size, mtime) -> content digest, for files whose modification time moved: one read a
# file per process, however many of its clips a batch holds
_DIGESTS: dict[tuple[str, int, int], str] = {}


def check_unchanged(path: str | Path, size: int | None, mtime_ns: int | None, digest: str | None = None) -> None:
    """Raise AudioError "changed since ingest" when the file is not the one ingest saw (a check
    before every decode; None skips it). Size and modification time as ingest recorded them
    pass at once. A file of the same size with another time (touched, or copied without its
    times) passes when its content still has ingest's `digest` (`fs.file_digest`)."""
    if size is None or mtime_ns is None:
        return
    try:
        now_size, now_mtime = fs.size_and_mtime(path)
        if (now_size, now_mtime) == (size, mtime_ns):
            return
        if now_size == size and digest:
            key = (str(path), now_size, now_mtime)
            if key not in _DIGESTS:
                if len(_DIGESTS) > 4096:
                    _DIGESTS.clear()
                _DIGESTS[key] = fs.file_digest(path)
            if _DIGESTS[key] == digest:
                return
            raise AudioError(f"{T.CHANGED_SINCE_INGEST}: content digest {_DIGESTS[key]} is not {digest} "
                             f"(same size, modified {mtime_ns} -> {now_mtime} ns)")
    except OSError as e:
        raise AudioError(f"unreadable: {e.strerror or e}") from e
    raise AudioError(f"{T.CHANGED_SINCE_INGEST}: size {size} -> {now_size} bytes, "
                     f"modified {mtime_ns} -> {now_mtime} ns")


def _decoder_message(e: Exception) -> str:
    msg = str(e)
    # libsndfile prefixes "Error opening 'PATH': "; the path is already in the row
    return re.sub(r"^Error opening .*?: ", "", msg).strip() or type(e).__name__


def load_clip(path: str | Path, start_s: float, duration_s: float, target_sr: int | None, mono: bool = True,
              expected_sr: int | None = None) -> np.ndarray:
    """Decode [start_s, start_s + duration_s) of a file as float32, mono (T,) or (C, T).

    Raises AudioError when the file is shorter than declared (truncated), cannot be decoded,
    or (given `expected_sr`) no longer has the sample rate it was probed with.
    """
    if _by_ffmpeg(path):
        from pipeline import ffmpeg

        try:
            data, sr, n = ffmpeg.read(path, start_s, duration_s, expected_sr)  # (T, C)
        except OSError as e:
            raise AudioError(f"decode failed: {e.strerror or e}") from e
    else:
        data, sr, n = _read_sndfile(path, start_s, duration_s, expected_sr)
    if len(data) < n - int(_LENGTH_SLACK_S * sr):
        raise AudioError(f"truncated: decoded {len(data)} of {n} frames at {start_s:.2f}s")
    if len(data) < n:  # a lossy header overstated the length a little: pad the end
        data = np.pad(data, ((0, n - len(data)), (0, 0)))
    audio = data.T  # (C, T)
    if mono:
        audio = audio.mean(axis=0)  # (T,)
    if target_sr is not None and target_sr != sr:
        audio = resample(audio, sr, target_sr)
    return np.ascontiguousarray(audio, dtype=np.float32)


def _read_sndfile(path, start_s: float, duration_s: float, expected_sr: int | None) -> tuple[np.ndarray, int, int]:
    """(frames (T, C) float32, sample rate, frames asked for) through libsndfile."""
    try:
        with open_sound(path) as f:
            sr = f.samplerate
            if expected_sr is not None and sr != expected_sr:
                raise AudioError(f"sample rate changed: the file is {sr} Hz now, the table says {expected_sr} Hz")
            start = int(round(start_s * sr))
            n = int(round(duration_s * sr))
            if _unknown_length(f):
                data = read_sequential(f, start, n)
            else:
                f.seek(start)
                data = f.read(n, dtype="float32", always_2d=True)
            return _wave_order(data, f.subtype), sr, n
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"decode failed: {_decoder_message(e)}") from e


# Vorbis I (section 4.3.9) and Opus (mapping family 1) store 3, 5, 6, 7 and 8 channels centre
# second and LFE last (L C R Ls Rs LFE); libsndfile hands them over in that order. WAVE, FLAC and
# FFmpeg's decoders use L R C LFE Ls Rs: the columns of the file's order to take, in WAVE order
_VORBIS_TO_WAVE = {3: [0, 2, 1], 5: [0, 2, 1, 3, 4], 6: [0, 2, 1, 5, 3, 4], 7: [0, 2, 1, 6, 5, 3, 4],
                   8: [0, 2, 1, 7, 5, 6, 3, 4]}


def _wave_order(data: np.ndarray, subtype: str) -> np.ndarray:
    """(T, C) frames as libsndfile decoded them -> channels in WAVE order, as every other
    decoder gives them (the loudness weighs L R C Ls Rs and leaves out the LFE by position)."""
    order = _VORBIS_TO_WAVE.get(data.shape[1]) if subtype in ("VORBIS", "OPUS") else None
    return data if order is None else data[:, order]


def cancels_in_mono(path, start_s: float, duration_s: float, checks: "SignalChecks") -> str | None:
    """Why a clip whose mono downmix is silent is not silent itself: its channels cancel (one's
    polarity flipped, a miswired or badly transferred recording). None when no channel is
    louder than silence either. Decodes the clip again, with its channels: for silent clips only."""
    channels = load_clip(path, start_s, duration_s, None, mono=False)
    if channels.shape[0] < 2 or all(checks.reason(ch) is not None for ch in channels):
        return None
    from pipeline.facts import stereo_correlation

    corr = stereo_correlation(channels)
    return (f"silent in mono: its channels cancel in the downmix, each louder than {checks.silence_dbfs} dBFS "
            f"(stereo correlation {corr:.2f}: out of phase)")


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    import torch
    import torchaudio.functional as AF

    with torch.no_grad():
        out = AF.resample(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)), orig_sr, target_sr)
    return out.numpy()


@dataclass(frozen=True)
class SignalChecks:
    """Thresholds for samples that are there but unusable."""

    silence_dbfs: float = T.SILENCE_DBFS  # RMS of the signal minus its mean below this: silent

    def reason(self, audio: np.ndarray) -> str | None:
        """Why this clip is unusable (`rejected`), or None when it is fine."""
        if audio.size == 0:
            return "empty clip"
        finite = np.isfinite(audio)
        if not finite.all():
            return f"non_finite_samples: {int((~finite).sum())} NaN/Inf sample(s)"
        ac = audio - audio.mean(axis=-1, keepdims=True)
        rms = float(np.sqrt(np.mean(ac.astype(np.float64) ** 2)))
        level = 20 * np.log10(rms) if rms > 0 else -np.inf
        if level < self.silence_dbfs:
            return f"silent: {level:.1f} dBFS after removing DC (threshold {self.silence_dbfs} dBFS)"
        return None
