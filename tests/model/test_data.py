"""Shard loader: decoding, seeded shuffling, worker split, exact restart, quality weighting."""

from __future__ import annotations

import io
from itertools import islice

import numpy as np
import pytest
import soundfile as sf
import torch

from model.data import AUDIO, PROMPTS, QUALITY, DataConfig, decode_audio, list_shards, make_loader

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _take(cfg, n, seed=0, start_batch=0):
    return list(islice(iter(make_loader(cfg, seed=seed, start_batch=start_batch)), n))


def test_decode_crop_pad_and_resample():
    buf = io.BytesIO()
    sf.write(buf, np.ones((8000, 2), np.float32) * 0.5, 8000, format="FLAC")  # 1 s stereo at 8 kHz
    out = decode_audio(buf.getvalue(), 20000, None)
    assert out.shape == (20000,) and out.dtype == np.float32
    assert abs(out[8000]) > 0.4 and np.all(out[16500:] == 0)  # resampled to 16 kHz, then zero-padded
    import random

    assert decode_audio(buf.getvalue(), 4000, random.Random(0)).shape == (4000,)


def test_batches_fields_and_determinism(shard_dir):
    cfg = DataConfig(shards=shard_dir, clip_seconds=0.5, batch_size=3, num_workers=0, shuffle_buffer=4)
    a, b = _take(cfg, 5), _take(cfg, 5)
    assert a[0][AUDIO].shape == (3, 8000) and a[0][QUALITY].dtype == torch.long
    assert all(1 <= q <= 5 for x in a for q in x[QUALITY].tolist())
    assert all(isinstance(p, str) and "tone" in p for x in a for p in x[PROMPTS])
    for x, y in zip(a, b):
        assert x[PROMPTS] == y[PROMPTS] and torch.equal(x[AUDIO], y[AUDIO])
    c = _take(cfg, 5, seed=1)
    assert [x[PROMPTS] for x in a] != [x[PROMPTS] for x in c]  # another seed, another order


@pytest.mark.parametrize("workers", [0, 2])
def test_start_batch_continues_the_stream(shard_dir, workers):
    cfg = DataConfig(shards=shard_dir, clip_seconds=0.25, batch_size=2, num_workers=workers, shuffle_buffer=4)
    whole = _take(cfg, 9)
    tail = _take(cfg, 4, start_batch=5)
    for x, y in zip(whole[5:], tail):
        assert x[PROMPTS] == y[PROMPTS] and torch.equal(x[AUDIO], y[AUDIO])


def test_every_sample_once_per_epoch(shard_dir):
    cfg = DataConfig(shards=shard_dir, clip_seconds=0.1, batch_size=1, num_workers=2, shuffle_buffer=4, random_crop=False)
    seen = [x[AUDIO][0, :50].numpy().tobytes() for x in _take(cfg, 8)]
    assert len(set(seen)) == 8  # 8 samples in the fixture, two shards, two workers


def test_quality_weights_select_levels(shard_dir):
    cfg = DataConfig(shards=shard_dir, clip_seconds=0.1, batch_size=4, num_workers=0, quality_weights=(0, 0, 0, 0, 1))
    levels = {q for x in _take(cfg, 3) for q in x[QUALITY].tolist()}
    assert levels == {5}


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        list_shards(str(tmp_path / "nothing-here-{000..001}.tar"))
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        list_shards(str(tmp_path))
    with pytest.raises(ValueError, match=r"quality_weights.*\(1, 2\)"):
        DataConfig(quality_weights=(1, 2))
