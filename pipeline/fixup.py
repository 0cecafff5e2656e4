"""Post-install fix-up for torchaudio on CPU-only torch (see ENVIRONMENT.md).

The torchaudio 2.11 wheel is CUDA-linked: with the CPU torch its native libraries fail to
load and `import torchaudio` raises. Without them torchaudio runs as pure Python, which is
all mosaiq uses (resample, MelSpectrogram, GriffinLim). This removes those libraries when,
and only when, they fail to load. Idempotent.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path


def broken_torchaudio_libs() -> list[Path]:
    spec = importlib.util.find_spec("torchaudio")
    if spec is None or spec.origin is None:
        return []
    lib_dir = Path(spec.origin).parent / "lib"
    import torch  # noqa: F401  (loads libc10 so only a CUDA dependency can fail)

    broken = []
    for so in sorted(lib_dir.glob("*.so")):
        try:
            ctypes.CDLL(str(so))
        except OSError:
            broken.append(so)
    return broken


def main() -> int:
    broken = broken_torchaudio_libs()
    if not broken:
        print("mosaiq-fixup: torchaudio native libraries load (or are absent); nothing to do")
        return 0
    spec = importlib.util.find_spec("torchaudio")
    for so in Path(spec.origin).parent.joinpath("lib").glob("*.so"):
        so.unlink()
    print(f"mosaiq-fixup: removed {len(broken)} CUDA-linked torchaudio libraries; torchaudio runs as pure Python")
    return 0


if __name__ == "__main__":
    sys.exit(main())
