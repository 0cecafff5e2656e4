"""Seeds in model/ come from pipeline.fs.derive_seed and give the numbers the hand-written
blake2b derivations gave before (crops, loader shuffles and training steps stay reproducible)."""

from __future__ import annotations

import hashlib
import random

import numpy as np

from model import clap, data
from model.train import step_seed


def _blake2b_le(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def test_step_seed_and_loader_rng_are_unchanged():
    for parts in [(0, "step", 5, 0), (123, "drop", 7, 1), (9, "shards", 0)]:
        assert step_seed(*parts) == _blake2b_le(repr(parts)) % 2**63
        assert data._rng(*parts).random() == random.Random(_blake2b_le(repr(parts))).random()


def test_clap_crop_offset_is_unchanged():
    wave = np.arange(clap.WINDOW_SAMPLES + 1000, dtype=np.float32)
    for seed, key in [(0, "clip-a"), (3, "x")]:
        start = _blake2b_le(f"{seed}:{key}") % 1001
        np.testing.assert_array_equal(clap.crop_window(wave, key, seed), wave[start : start + clap.WINDOW_SAMPLES])
