"""Helpers that write checkpoints the way upstream code and older library versions write them."""

from __future__ import annotations

import pickle
import types
import zipfile

import numpy as np
import torch


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
