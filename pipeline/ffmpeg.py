"""Audio that libsndfile cannot read (AAC and ALAC in .m4a/.mp4, WMA, WebM/Matroska, AC-3, ...),
decoded by FFmpeg's libraries as PyAV ships them (`pip install 'mosaiq[ffmpeg]'`).

`pipeline.audio` sends files with one of `audio.FFMPEG_EXTENSIONS` here and keeps the same
contract: `probe` reads the header and checks the end of the stream decodes, `read` decodes
frames [start, start + n) by seeking to a key frame and trimming by timestamps. Without PyAV
such a file is an `error` row that says how to read it, never silently left out of a scan.
"""

from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Iterator

import numpy as np

from pipeline import fs
from pipeline.audio import AudioError, span_of

# the demuxer (FFmpeg's format name) each extension should hold: a mislabelled file is refused,
# as libsndfile's formats are
EXPECTED_DEMUXER = {
    ".m4a": "mp4", ".mp4": "mp4", ".aac": "aac", ".wma": "asf", ".webm": "matroska", ".mka": "matroska",
    ".ac3": "ac3", ".wv": "wv", ".ape": "ape", ".amr": "amr",
    # only what libsndfile would read in part comes here (`audio._sndfile_falls_short`): a VBR .mp3
    # without a Xing header, a chained Ogg file
    ".mp3": "mp3", ".ogg": "ogg", ".oga": "ogg", ".opus": "ogg",
}
_RAW_STREAMS = {"aac", "ac3", "amr", "mp3"}  # bare codec streams (ADTS, ...): no container, no index, no length
# timestamps that start again at each chained stream, and a length that is the last stream's:
# counted by decoding from the start
_CHAINED = {"ogg"}
_INSTALL = "pip install 'mosaiq[ffmpeg]' (PyAV, which ships FFmpeg), or convert it first: ffmpeg -i IN OUT.flac"


@contextlib.contextmanager
def _open(path) -> Iterator:
    """An open PyAV input container on a local file or an object in object storage."""
    p = fs.location(path)
    try:
        import av
    except ImportError:
        raise AudioError(f"not decodable audio: {p.suffix} files are decoded by FFmpeg, which is not installed: {_INSTALL}") from None
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(p.open("rb")) if fs.is_remote(p) else str(p)
        except Exception as e:  # noqa: BLE001 - store clients raise their own types
            raise AudioError(f"unreadable: {type(e).__name__}: {e}") from e
        try:
            container = stack.enter_context(av.open(source, metadata_errors="ignore"))
        except av.FFmpegError as e:
            raise AudioError(f"not decodable audio: {_message(e)}") from e
        yield container


def _message(e: Exception) -> str:
    """FFmpeg's reason without the path (the row has it)."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _demuxers(container) -> set[str]:
    """The names FFmpeg's demuxer answers to ("mov,mp4,m4a,3gp,3g2,mj2" for MP4)."""
    return set(container.format.name.split(","))


def _stream(container):
    if not container.streams.audio:
        raise AudioError(f"no audio stream: the {container.format.name} container holds "
                         f"{', '.join(s.type for s in container.streams) or 'no streams'}")
    return container.streams.audio[0]


def _pts_samples(frame, rate: int) -> int | None:
    """A decoded frame's timestamp in samples (None: it has none)."""
    return None if frame.pts is None else int(round(frame.pts * Fraction(frame.time_base) * rate))


def frame_array(frame) -> np.ndarray:
    """A decoded PyAV audio frame as (T, C) float32 in [-1, 1], whatever its sample format."""
    a = frame.to_ndarray()
    a = a.T if frame.format.is_planar else a.reshape(-1, frame.layout.nb_channels)
    kind = frame.format.name.rstrip("p")
    if kind == "u8":
        return (a.astype(np.float32) - 128.0) / 128.0
    if kind in ("s16", "s32", "s64"):
        return (a.astype(np.float64) / float(2 ** (8 * a.dtype.itemsize - 1))).astype(np.float32)
    return a.astype(np.float32, copy=False)


# decoding starts this far before the asked-for start: a lossy frame right after a seek lacks
# its predecessor's overlap (AAC, WMA), so the first frames decoded are thrown away
_PREROLL_S = 0.2


def _decode(container, stream, rate: int, start: int, n: int | None, seek: bool = True) -> np.ndarray:
    """Frames [start, start + n) (n None: to the end) as (T, C) float32. Sample 0 is the first
    sample decoded from the beginning, as `ffmpeg -i IN OUT.wav` writes it (a WMA stream's first
    frame carries a timestamp of tens of ms, an AAC one in MP4 zero). A stream whose timestamps
    count samples (MP4: 1/rate) is entered by seeking; one with coarser ones (ASF, Matroska: ms)
    is decoded from the beginning and its samples counted, as a timestamp there is off by up to
    half a millisecond. `seek` False: decoded from the beginning and counted (chained streams)."""
    import av

    channels = stream.codec_context.layout.nb_channels
    by_pts = seek and Fraction(stream.time_base) <= Fraction(1, rate)
    out, pos, origin = [], 0, None
    try:
        if start > 0 and by_pts:  # the origin from the first frame, then to the key frame before the pre-roll
            first = next(container.decode(stream), None)
            origin = _pts_samples(first, rate) if first is not None else None
            if origin is None:
                by_pts = False
            else:
                at = (origin + start) / rate - _PREROLL_S
                container.seek(max(0, int(at / Fraction(stream.time_base))), stream=stream, backward=True)
            if not by_pts:
                container.seek(0, stream=stream, backward=True)
        for frame in container.decode(stream):
            data = frame_array(frame)
            pts = _pts_samples(frame, rate) if by_pts else None
            if pts is not None and origin is None:
                origin = pts
            first = pts - origin if pts is not None else pos
            pos = first + len(data)
            if (part := span_of(data, first, start, n)) is not None:
                out.append(part)
            if n is not None and pos >= start + n:
                break
    except av.FFmpegError as e:
        raise AudioError(f"decode failed: {_message(e)}") from e
    return np.concatenate(out) if out else np.zeros((0, channels), np.float32)


def _counted(container, stream, rate: int) -> tuple[int, int, int, str]:
    """The probe of a stream that gives no trustworthy length: decoded to its end and counted."""
    frames = len(_decode(container, stream, rate, 0, None, seek=False))
    if frames <= 0:
        raise AudioError("no audio frames: the stream decodes to nothing")
    return rate, stream.codec_context.layout.nb_channels, frames, f"FFMPEG:{stream.codec_context.name}"


def probe(path) -> tuple[int, int, int, str]:
    """(sample rate, channels, frames, format) of the first audio stream; AudioError for a file
    FFmpeg cannot open, a mislabelled one, one without audio, or one whose end does not decode
    (truncated). The length is the container's (a stream that gives none is decoded to count)."""
    suffix = fs.location(path).suffix.lower()
    with _open(path) as c:
        demuxers = _demuxers(c)
        expected = EXPECTED_DEMUXER.get(suffix)
        if expected is not None and expected not in demuxers:
            raise AudioError(f"wrong extension: {suffix} file holds {c.format.name} data")
        s = _stream(c)
        rate, channels = int(s.codec_context.sample_rate or 0), int(s.codec_context.layout.nb_channels or 0)
        if rate <= 0 or channels <= 0:
            raise AudioError(f"no audio frames (rate={rate}, channels={channels})")
        if demuxers & (_RAW_STREAMS | _CHAINED):  # no index (the length is guessed from the bit rate), or chained
            return _counted(c, s, rate)
        if s.duration:
            frames = int(round(s.duration * Fraction(s.time_base) * rate))
        elif c.duration:  # microseconds
            frames = int(round(c.duration * rate / 1_000_000))
        else:
            return _counted(c, s, rate)
        tail = _decode(c, s, rate, max(0, frames - rate), rate)
        if len(tail) == 0:
            raise AudioError(f"truncated: the container declares {frames} frames but the end holds none")
        return rate, channels, frames, f"FFMPEG:{s.codec_context.name}"


def read(path, start_s: float, duration_s: float, expected_sr: int | None = None) -> tuple[np.ndarray, int, int]:
    """(frames (T, C) float32, sample rate, frames asked for) of [start_s, start_s + duration_s)."""
    with _open(path) as c:
        s = _stream(c)
        rate = int(s.codec_context.sample_rate)
        if expected_sr is not None and rate != expected_sr:
            raise AudioError(f"sample rate changed: the file is {rate} Hz now, the table says {expected_sr} Hz")
        n = int(round(duration_s * rate))
        chained = bool(_demuxers(c) & _CHAINED)
        return _decode(c, s, rate, int(round(start_s * rate)), n, seek=not chained), rate, n
