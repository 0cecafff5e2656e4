"""p-MOS scorers: the wav2vec2 regressor round-trips and clamps, clips score alone as in a batch,
DistillMOS groups lengths. QAMA conversion is tested in test_qama.py."""

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from model import pmos


def tiny_backbone(seed=0, layer_norm=False):
    torch.manual_seed(seed)
    cfg = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm,
    )
    return Wav2Vec2Model(cfg).eval()


def waves(n=3, seconds=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32) for _ in range(n)]


def test_regressor_is_in_range_and_round_trips(tmp_path):
    model = pmos.Wav2Vec2PMOS(tiny_backbone()).eval()
    with torch.no_grad():
        model.head.bias.fill_(3.0)
    model.save_pretrained(tmp_path / "m")
    scorer = pmos.build_scorer("wav2vec2", tmp_path / "m")
    w = waves()
    s = scorer(w)
    assert s.shape == (3,) and np.all((s >= 1) & (s <= 5))
    with torch.no_grad():
        ref = model(torch.from_numpy(np.stack(w))).numpy()
    np.testing.assert_allclose(s, ref, rtol=1e-5, atol=1e-5)


def test_a_clip_scores_the_same_alone_and_in_a_mixed_length_batch(tmp_path):
    model = pmos.Wav2Vec2PMOS(tiny_backbone(layer_norm=True)).eval()
    with torch.no_grad():
        model.head.bias.fill_(3.0)
        model.head.weight.mul_(10)
    model.save_pretrained(tmp_path / "m")
    scorer = pmos.build_scorer("wav2vec2", tmp_path / "m")
    short, long_ = waves(2, 1.0)[0], waves(1, 2.0, seed=5)[0]
    alone = scorer([short])[0]
    batched = scorer([short, long_])[0]
    assert alone == pytest.approx(batched, abs=1e-5)  # no zero-padding reaches the model


def test_head_clamps_to_one_and_five(tmp_path):
    model = pmos.Wav2Vec2PMOS(tiny_backbone())
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(9.0)
    assert torch.all(model(torch.zeros(2, 16000)) == 5.0)
    with torch.no_grad():
        model.head.bias.fill_(-9.0)
    assert torch.all(model(torch.zeros(2, 16000)) == 1.0)


def test_missing_model_folder_and_unknown_scorer_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert-qama"):
        pmos.build_scorer("wav2vec2", tmp_path)
    with pytest.raises(ValueError, match="needs --model"):
        pmos.build_scorer("wav2vec2", None)
    with pytest.raises(ValueError, match="unknown scorer 'mosnet'"):
        pmos.build_scorer("mosnet")


def test_distillmos_scores_groups_of_lengths():
    scorer = pmos.build_scorer("distillmos")
    w = waves(2, 1.0) + waves(1, 2.0, seed=9)
    s = scorer(w)
    assert s.shape == (3,) and np.all((s >= 1) & (s <= 5))
    np.testing.assert_allclose(scorer([w[2]]), s[2:], rtol=1e-4)
