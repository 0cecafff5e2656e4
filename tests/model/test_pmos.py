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


def hf_to_fairseq(sd):
    """Inverse of the converter's key map: builds a checkpoint with fairseq's key names."""
    inverse = {
        "feature_projection.projection": "post_extract_proj",
        "feature_projection.layer_norm": "layer_norm",
        "masked_spec_embed": "mask_emb",
        "encoder.pos_conv_embed.conv.bias": "encoder.pos_conv.0.bias",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0": "encoder.pos_conv.0.weight_g",
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": "encoder.pos_conv.0.weight_v",
        ".attention.": ".self_attn.",
        ".layer_norm.": ".self_attn_layer_norm.",
        "feed_forward.intermediate_dense": "fc1",
        "feed_forward.output_dense": "fc2",
        ".conv.": ".0.",
    }
    out = {}
    for k, v in sd.items():
        f = k
        if k.startswith("feature_extractor"):
            f = f.replace(".conv.", ".0.").replace(".layer_norm.", ".2.")
        elif k.startswith("encoder.layers"):
            for a, b in [(".attention.", ".self_attn."), (".layer_norm.", ".self_attn_layer_norm."),
                         ("feed_forward.intermediate_dense", "fc1"), ("feed_forward.output_dense", "fc2")]:
                f = f.replace(a, b)
        else:
            for a, b in inverse.items():
                if f.startswith(a):
                    f = b + f[len(a):]
                    break
        out[f] = v.clone()
    return out


def test_qama_fairseq_checkpoint_converts_to_the_same_model(tmp_path):
    backbone = tiny_backbone(seed=3)
    ref = pmos.Wav2Vec2PMOS(backbone).eval()
    with torch.no_grad():
        ref.head.bias.fill_(3.0)
    fair = hf_to_fairseq(backbone.state_dict())
    assert "encoder.layers.0.self_attn.k_proj.weight" in fair and "post_extract_proj.weight" in fair
    assert "feature_extractor.conv_layers.0.2.weight" in fair and "encoder.pos_conv.0.weight_g" in fair
    qama = {f"ssl_model.{k}": v for k, v in fair.items()}
    qama.update({"output_layer_arch1.weight": ref.head.weight.detach().clone(), "output_layer_arch1.bias": ref.head.bias.detach().clone(),
                 "fc1.weight": torch.zeros(256, 32), "output_layer_class.weight": torch.zeros(5, 32)})
    torch.save(qama, tmp_path / "qama_full.pt")
    torch.save({"model": fair, "cfg": {"model": {"_name": "wav2vec2"}}}, tmp_path / "checkpoint_best.pt")
    out = pmos.convert_qama(tmp_path / "qama_full.pt", tmp_path / "converted", tmp_path / "checkpoint_best.pt",
                            num_heads=2, conv_stride=(5, 2, 2))
    loaded = pmos.Wav2Vec2PMOS.from_pretrained(out)
    x = torch.from_numpy(np.stack(waves(2)))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x))


class Evil:
    """Any non-tensor object in a checkpoint: loading it would need unpickling code."""


def test_converter_refuses_unknown_keys_and_pickled_objects(tmp_path):
    fair = hf_to_fairseq(tiny_backbone().state_dict())
    fair["encoder.mystery.weight"] = torch.zeros(2)
    qama = {f"ssl_model.{k}": v for k, v in fair.items()}
    qama.update({"output_layer_arch1.weight": torch.zeros(1, 32), "output_layer_arch1.bias": torch.zeros(1)})
    torch.save(qama, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="unrecognised fairseq key"):
        pmos.convert_qama(tmp_path / "q.pt", tmp_path / "o", num_heads=2)

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        pmos.convert_qama(tmp_path / "evil.pt", tmp_path / "o2")


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
