"""Fixtures for model tests: synthetic mosaiq shards and a tiny random text encoder on disk."""

from __future__ import annotations

import pickle
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch


SR = 16_000
LEVEL_PREFIX = {1: "low quality", 2: "", 3: "medium quality", 4: "", 5: "high quality"}


def write_test_shards(dir, n: int, seed: int, seconds: float = 1.28, per_shard: int = 4) -> list[str]:
    """Write `n` samples as mosaiq shards into `dir`, without Ray; return the shard paths.

    Each clip is a seeded chord of sines whose added noise grows as its quality level falls,
    written as a WAV file and described by a caption-table row (one Parquet part); the export
    stage's own planning (`pipeline.export`) cuts the rows into shards, `pipeline.shards.write_shard`
    writes each `<key>.flac` + `<key>.json` shard in this process, and the index files follow.
    """
    import pyarrow as pa

    from pipeline import export, fs, shards
    from schemas import tables as T

    dir = Path(dir)
    src = dir.parent / f"{dir.name}_source"
    (src / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    rows = []
    for i in range(n):
        level = int(i % 5) + 1
        f0 = float(rng.choice([110.0, 220.0, 330.0, 440.0]))
        wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3))
        wave = 0.3 * wave / np.abs(wave).max() + (0.02 * (5 - level)) * rng.standard_normal(len(t))
        path = src / "audio" / f"clip{i:05d}.wav"
        sf.write(path, wave.astype(np.float32), SR, subtype="PCM_16")
        caption = f"a tone at {int(f0)} hertz"
        prefix = LEVEL_PREFIX[level]
        rows.append({**T.blank_row(T.CAPTIONS_SCHEMA),
            T.CLIP_ID: f"clip{seed}x{i:05d}", T.AUDIO_PATH: str(path), T.SOURCE_DIGEST: "", T.START_S: 0.0,
            T.DURATION_S: seconds, T.SOURCE_DURATION_S: seconds, T.SOURCE_SAMPLE_RATE: SR, T.SOURCE_CHANNELS: 1,
            T.SOURCE_FORMAT: "WAV", T.CAPTION_ORIGINAL: caption, T.TAGS: [], T.METADATA_JSON: "{}",
            T.STATUS: T.OK, T.REASON: "", T.PMOS: 3.0 + 0.2 * level, T.SCORER: "synthetic",
            T.QUALITY_LEVEL: level, T.QUALITY_PREFIX: prefix, T.STATS_ID: "test", T.CANDIDATES: [],
            T.CANDIDATE_REJECTS: [], T.CLAP_ORIGINAL: None, T.CLAP_CANDIDATES: [], T.CLAP_SCORE: None,
            T.CAPTION: caption, T.CAPTION_SOURCE: "original", T.CAPTION_NOTE: "",
            T.PROMPT: f"{prefix}, {caption}" if prefix else caption,
        })
    captions = src / "captions"
    fs.atomic_write_table(pa.Table.from_pylist(rows, schema=T.CAPTIONS_SCHEMA), captions / fs.part_name(0))
    ok, _ = export.split_rows(export.read_captions(captions))
    plan = export.plan_shards(ok, export.ExportConfig(seed=seed, shard_max_count=per_shard))
    dir.mkdir(parents=True, exist_ok=True)
    results = [shards.write_shard(spec, str(dir)) for spec in plan]
    export.write_index_files(dir, plan, results)
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


# --- checkpoints written the way upstream code and older library versions write them -----------


class _Numpy1Pickler(pickle._Pickler):
    """Writes numpy scalars under numpy 1's module name, as files saved before numpy 2 hold them."""

    def save_global(self, obj, name=None):
        if obj is np._core.multiarray.scalar:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


NUMPY1_PICKLE = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=_Numpy1Pickler, dump=pickle.dump)


def save_with_numpy1_names(obj, path):
    """torch.save, with numpy scalars named as numpy 1 pickles them (numpy.core.multiarray.scalar)."""
    torch.save(obj, path, pickle_module=NUMPY1_PICKLE)
    assert b"numpy.core.multiarray" in _pickle_bytes(path)


def _pickle_bytes(path) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


@pytest.fixture(scope="session", name="save_with_numpy1_names")
def save_with_numpy1_names_fixture():
    """`save_with_numpy1_names(obj, path)`: torch.save as a numpy-1 era file (numpy.core names)."""
    return save_with_numpy1_names
