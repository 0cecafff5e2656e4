"""The shard loader distrusts its shards (issue 15, item 8): each shard here is a tar built by
hand, as an attacker or a bad disk would make it, not by the export stage."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tracemalloc
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from model.data import AUDIO, PROMPTS, DataConfig, SampleError, TooManyBadSamples, decode_audio, make_loader
from schemas import shard as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SR = 16_000


def flac(seconds: float = 0.5, f: float = 440.0, sr: int = SR) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32), sr, format="FLAC")
    return buf.getvalue()


def silence_flac(seconds: float, sr: int = SR) -> bytes:
    """A long FLAC that compresses to almost nothing (20 minutes: about 60 KB)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sr, channels=1, format="FLAC") as out:
        block = np.zeros(sr * 60, np.float32)
        for i in range(0, int(seconds), 60):
            out.write(block[: int(min(60, seconds - i) * sr)])
    return buf.getvalue()


def without_length(data: bytes) -> bytes:
    """The same FLAC with STREAMINFO total_samples = 0 (legal: the length is unknown)."""
    data = bytearray(data)
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0
    at = 8 + 10  # rate(20) ch(3) bps(5) total(36)
    word = int.from_bytes(data[at:at + 8], "big")
    data[at:at + 8] = (word & ~((1 << 36) - 1)).to_bytes(8, "big")
    return bytes(data)


def meta(key: str, level: int = 3) -> bytes:
    return json.dumps({S.PROMPT: f"prompt {key}", S.QUALITY_LEVEL: level, S.CLIP_ID: key}).encode()


def sample(key: str, audio: bytes | None = None) -> list[tuple[str, bytes]]:
    return [(f"{key}.{S.AUDIO_EXT}", flac() if audio is None else audio), (f"{key}.{S.JSON_EXT}", meta(key))]


def write_tar(path: Path, members: list) -> Path:
    """Members are (name, bytes), or a TarInfo for a member without data (links, folders)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def config(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), clip_seconds=0.25, batch_size=1, num_workers=0, shuffle_buffer=1)
    return DataConfig(**{**base, **kw})


def prompts(cfg: DataConfig, batches: int, start_batch: int = 0) -> list[str]:
    return [p for b in islice(iter(make_loader(cfg, seed=0, start_batch=start_batch)), batches) for p in b[PROMPTS]]


GOOD = {"prompt g0", "prompt g2", "prompt g3"}


def test_unsafe_names_links_and_extra_members_are_refused(tmp_path):
    link = tarfile.TarInfo("link.flac")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    hard = tarfile.TarInfo("hard.flac")
    hard.type, hard.linkname = tarfile.LNKTYPE, "g0.flac"
    write_tar(tmp_path / "shard-000000.tar", [
        *sample("g0"),
        *sample("../evil"), *sample("/tmp/abs"), *sample("dir/inner"), *sample("a\\b"),
        *sample("g1"), ("g1.txt", b"#!/bin/sh\n"),  # an extra member in an otherwise good sample
        ("evil.sh", b"#!/bin/sh\nrm -rf ~\n"),
        link, ("link.json", meta("link")), hard, ("hard.json", meta("hard")),
        *sample("nl\n"),  # KEY_RE's `$` matches before a trailing newline; a key must match all of it
        ("dots.x.flac", flac()), ("dots.x.json", meta("dots.x")),
        *sample("g2"), *sample("g3"),
    ])
    seen = prompts(config(tmp_path), 8)  # more batches than good samples: the stream wraps around
    assert set(seen) == GOOD  # 10 bad samples: within the default max_bad_samples


def test_audio_longer_than_the_clip_is_refused_before_it_is_decoded(tmp_path):
    long = silence_flac(20 * 60)  # 20 minutes in about 60 KB; 77 MB as float32
    assert len(long) < 200_000
    write_tar(tmp_path / "shard-000000.tar", [
        *sample("g0"), *sample("long", long), *sample("g2"), *sample("stream", without_length(long)), *sample("g3"),
    ])
    tracemalloc.start()
    try:
        seen = prompts(config(tmp_path), 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(seen) == GOOD
    assert peak < 30e6, f"{peak / 1e6:.0f} MB traced: a long member was decoded in full"


def test_decode_audio_bounds_what_it_decodes():
    long = silence_flac(30)
    assert decode_audio(long, 1000, None, max_seconds=40).shape == (1000,)
    with pytest.raises(SampleError, match="longer than"):
        decode_audio(long, 1000, None, max_seconds=12.0)
    with pytest.raises(SampleError, match="longer than"):
        decode_audio(without_length(long), 1000, None, max_seconds=12.0)  # measured while reading
    with pytest.raises(SampleError, match="not a FLAC"):
        decode_audio(b"RIFF....WAVEfmt " + bytes(100), 1000, None)


def test_a_member_over_the_byte_limit_is_refused(tmp_path):
    noise = io.BytesIO()
    sf.write(noise, np.random.default_rng(0).uniform(-1, 1, SR).astype(np.float32), SR, format="FLAC")
    assert len(noise.getvalue()) > 20_000
    write_tar(tmp_path / "shard-000000.tar", [*sample("g0"), *sample("big", noise.getvalue()), *sample("g2"), *sample("g3")])
    assert set(prompts(config(tmp_path, max_member_bytes=20_000), 6)) == GOOD
    assert set(prompts(config(tmp_path), 6)) == GOOD | {"prompt big"}


def flipped_flac() -> bytes:
    """A FLAC whose header is fine and whose body does not decode."""
    data = bytearray(flac(0.5))
    mid = len(data) // 2
    data[mid:mid + 200] = bytes(b ^ 0xFF for b in data[mid:mid + 200])
    return bytes(data)


def corrupt_shard(path: Path) -> Path:
    good = flac(0.5)
    bad_level = [("badlevel.flac", good), ("badlevel.json", meta("badlevel", level=9))]
    return write_tar(path, [
        *sample("g0"),
        *sample("garbage", np.random.default_rng(1).bytes(5000)),  # the header does not parse
        *sample("flipped", flipped_flac()),  # the header parses, the body does not decode
        *sample("cut", good[: len(good) // 2]),
        ("badjson.flac", good), ("badjson.json", b"{not json"), *bad_level,
        ("nojson.flac", good), ("noflac.json", meta("noflac")),
        *sample("g2"), *sample("g3"),
    ])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog, batch_size):
    corrupt_shard(tmp_path / "shard-000000.tar")
    with caplog.at_level(logging.WARNING, logger="model.data"):
        seen = prompts(config(tmp_path, batch_size=batch_size), 12)
    assert set(seen) == GOOD and len(seen) == 12 * batch_size
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key in ("garbage", "flipped", "cut", "badjson", "badlevel", "nojson", "noflac"):
        assert f"'{key}'" in logged and logged.count(f"sample '{key}'") == 1, key  # once, not once per epoch
    assert "shard-000000.tar" in logged


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_bad_samples_stop_with_the_shard_and_the_reasons(tmp_path, workers):
    corrupt_shard(tmp_path / "shard-000000.tar")
    if workers:
        write_tar(tmp_path / "shard-000001.tar", [*sample("h0"), *sample("h1")])
    cfg = config(tmp_path, max_bad_samples=3, num_workers=workers)
    with pytest.raises(TooManyBadSamples) as e:
        prompts(cfg, 20)
    msg = str(e.value)
    assert "shard-000000.tar" in msg and "max_bad_samples" in msg and "3" in msg
    assert "'garbage'" in msg and "not a FLAC stream" in msg
    with pytest.raises(TooManyBadSamples, match="'garbage'"):
        prompts(config(tmp_path, max_bad_samples=0), 4)
    with pytest.raises(ValueError, match="max_bad_samples"):
        DataConfig(max_bad_samples=-1)


@pytest.mark.parametrize("workers", [0, 2])
def test_restart_is_exact_across_a_sample_that_fails_to_decode(tmp_path, workers):
    write_tar(tmp_path / "shard-000000.tar", [*sample("g0"), *sample("flipped", flipped_flac()), *sample("g2"), *sample("g3")])
    write_tar(tmp_path / "shard-000001.tar", [m for i in range(6) for m in sample(f"h{i}", flac(0.5, f=200.0 + 50 * i))])
    cfg = config(tmp_path, batch_size=2, shuffle_buffer=4, num_workers=workers)
    whole = list(islice(iter(make_loader(cfg, seed=0)), 12))
    tail = list(islice(iter(make_loader(cfg, seed=0, start_batch=7)), 5))
    for x, y in zip(whole[7:], tail):
        assert x[PROMPTS] == y[PROMPTS] and torch.equal(x[AUDIO], y[AUDIO])
    assert all(b[AUDIO].shape == (2, 4000) for b in whole)
    assert "prompt flipped" not in {p for b in whole for p in b[PROMPTS]}
    assert sum(len(set(b[PROMPTS])) == 1 for b in whole) >= 1  # the failed sample's place taken by its neighbour


def test_a_truncated_shard_gives_its_complete_samples_and_training_goes_on(tmp_path):
    cut = write_tar(tmp_path / "shard-000000.tar", [*sample("g0"), *sample("g2"), *sample("lost"), *sample("lost2")])
    data = cut.read_bytes()
    at = data.index(b"lost.flac")  # inside the header of lost.flac: cut in the middle of its data
    cut.write_bytes(data[: at + 512 + 3000])
    write_tar(tmp_path / "shard-000001.tar", sample("g3"))
    assert set(prompts(config(tmp_path), 9)) == GOOD


def test_hostile_names_are_shown_short_and_escaped():
    from model.data import member_problem

    msg = member_problem(tarfile.TarInfo("x" * 5000 + "\x1b[2J.flac"), "x" * 5000 + "\x1b[2J", "flac", 1 << 20)
    assert "5009 characters" in msg and len(msg) < 400 and "\x1b" not in msg
    assert member_problem(tarfile.TarInfo("ok\x1b.json"), "ok\x1b", "json", 1 << 20).startswith("member 'ok\\x1b.json'")
