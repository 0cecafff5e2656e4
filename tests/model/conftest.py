"""Fixtures for model tests: synthetic mosaiq shards and a tiny random text encoder on disk."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from schemas import shard as S

SR = 16_000
LEVEL_PREFIX = {1: "low quality", 2: "", 3: "medium quality", 4: "", 5: "high quality"}


def write_test_shards(dir, n: int, seed: int, seconds: float = 1.28, per_shard: int = 4) -> list[str]:
    """Write `n` samples as mosaiq shards (`<key>.flac` + `<key>.json`) into `dir`; return the paths.

    Each clip is a seeded chord of sines whose added noise grows as its quality level falls.
    This stands in for the export stage and can be swapped for it.
    """
    import webdataset as wds

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    with wds.ShardWriter(str(dir / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            level = int(i % 5) + 1
            f0 = float(rng.choice([110.0, 220.0, 330.0, 440.0]))
            wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3))
            wave = 0.3 * wave / np.abs(wave).max() + (0.02 * (5 - level)) * rng.standard_normal(len(t))
            buf = io.BytesIO()
            sf.write(buf, wave.astype(np.float32), SR, format="FLAC")
            caption = f"a tone at {int(f0)} hertz"
            prefix = LEVEL_PREFIX[level]
            meta = {
                S.PROMPT: f"{prefix}, {caption}" if prefix else caption,
                S.CAPTION: caption,
                S.CAPTION_ORIGINAL: caption,
                S.QUALITY_LEVEL: level,
                S.QUALITY_PREFIX: prefix,
                S.PMOS: 3.0 + 0.2 * level,
                S.CLAP_SCORE: None,
                S.SECONDS_START: 0.0,
                S.SECONDS_TOTAL: seconds,
                S.SAMPLE_RATE: SR,
                S.CLIP_ID: f"clip{i:05d}",
                S.SOURCE: "synthetic",
                S.STATS_ID: "test",
                S.VERSION: S.SHARD_SAMPLE_VERSION,
            }
            assert not S.validate_sample_json(meta)
            sink.write({"__key__": f"clip{i:05d}", S.AUDIO_EXT: buf.getvalue(), S.JSON_EXT: json.dumps(meta).encode()})
    return sorted(str(p) for p in dir.glob("*.tar"))


def write_tiny_text_encoder(dir) -> str:
    """A random 1-layer T5 encoder with a byte-level BPE tokenizer, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    dir = Path(dir)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["high quality, a tone at 440 hertz", "low quality, a piano melody", "medium quality, drums and bass"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(str(dir))
    cfg = T5Config(vocab_size=len(fast), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                   pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, decoder_start_token_id=fast.pad_token_id)
    import torch

    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(str(dir))
    return str(dir)


@pytest.fixture(scope="session")
def text_encoder_dir(tmp_path_factory) -> str:
    return write_tiny_text_encoder(tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("shards")
    write_test_shards(d, n=8, seed=0)
    return str(d)


@pytest.fixture(scope="session")
def shard_writer():
    """`write_test_shards` itself, for tests that write their own shards."""
    return write_test_shards


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one thread, and the test machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLIP_S = 1.28  # 128 mel frames


def make_tiny_train_config(shards: str, text_dir: str, out: str, **kw):
    """A tiny-preset TrainConfig over `shards` (1.28 s clips, 64 tokens); `kw` overrides top-level keys."""
    from jobs.config import from_dict
    from model.train import TrainConfig

    data = {"shards": shards, "clip_seconds": CLIP_S, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 8}
    data.update(kw.pop("data", {}))
    raw = {
        "output_dir": out, "preset": "tiny", "model": {"patch_size": [16, 8]},
        "data": data, "text": {"path": text_dir},
        "optim": {"lr": 2e-3, "warmup_steps": 10, "ema_decay": 0.99},
        "log_every": 10, "checkpoint_every": 1000, "seed": 0,
    }
    raw.update(kw)
    return from_dict(TrainConfig, raw)


@pytest.fixture(scope="session")
def tiny_train_config():
    """`make_tiny_train_config(shards, text_dir, out, **overrides)`: a TrainConfig for the tiny preset."""
    return make_tiny_train_config
