"""`safe_torch_load` reads what upstream training code pickles beside its tensors (numpy
scalars from numpy 1 and 2, dtypes, argparse.Namespace) and refuses everything else by name."""

from __future__ import annotations

import argparse
import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch


from model.checkpoint import UnsafeCheckpointError, safe_torch_load  # noqa: E402


def upstream_like():
    """What LAION's and fairseq's checkpoints hold beside their tensors."""
    return {
        "epoch": 3,
        "state_dict": {"module.w": torch.ones(2)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": np.float64(1e-4), "params": [0]}]},
        "args": argparse.Namespace(arch="wav2vec2", layer_norm_first=True, lr=[np.float32(5e-4)], conv_bias=None),
        "extra_state": {"metrics": collections.OrderedDict(train=[("loss", 0, "AverageMeter", {"sum": np.float64(2.5), "count": np.int64(4)})])},
        "dtype": np.dtype("float32"),
    }


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-names", "numpy1-names"])
def test_upstream_types_load(tmp_path, numpy1, save_with_numpy1_names):
    path = tmp_path / "ckpt.pt"
    (save_with_numpy1_names if numpy1 else torch.save)(upstream_like(), path)
    got = safe_torch_load(path)
    assert got["optimizer"]["param_groups"][0]["lr"] == np.float64(1e-4)
    assert isinstance(got["optimizer"]["param_groups"][0]["lr"], np.float64)
    assert got["args"].layer_norm_first is True and got["args"].lr == [np.float32(5e-4)]
    assert got["extra_state"]["metrics"]["train"][0][3]["count"] == 4
    assert got["dtype"] == np.float32
    torch.testing.assert_close(got["state_dict"]["module.w"], torch.ones(2))


class MyDict(collections.OrderedDict):
    """An OrderedDict subclass: unpickling it would import and run this module's code."""


class Custom:
    pass


class Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload, name",
    [
        (MyDict(w=torch.ones(1)), "MyDict"),
        ({"model": {"w": torch.ones(1)}, "extra": Custom()}, "Custom"),
        ({"x": Shell()}, "system"),
        ({"lr": np.ones(2)}, "numpy.ndarray"),  # arrays are not on the list (only scalars and dtypes)
    ],
    ids=["OrderedDict-subclass", "custom-class", "os.system-reduce", "ndarray"],
)
def test_anything_else_is_refused_by_name(tmp_path, payload, name, capfd):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_torch_load(path, what="CLAP checkpoint")
    assert name in str(err.value) and "CLAP checkpoint" in str(err.value) and "weights_only=True" in str(err.value)
    assert "pwned" not in capfd.readouterr().out


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_torch_load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt' cannot be read") as err:
        safe_torch_load(tmp_path / "junk.pt")
    assert not isinstance(err.value, UnsafeCheckpointError)
