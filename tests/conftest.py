"""Shared fixtures: offline environment, the bundled sample, one embedded Ray per session."""

from __future__ import annotations

import os

# no network at test time: any hub lookup fails fast instead of downloading
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray 2.60 clusters use token auth after a first init
# a loaded 2-core machine can starve a raylet's heartbeats for a while: wait instead of failing
os.environ.setdefault("RAY_health_check_failure_threshold", "100")
os.environ.setdefault("RAY_health_check_timeout_ms", "60000")

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


# fixtures that start Ray, a Ray cluster or a server: a test that uses one must be marked slow,
# so `make test-fast` (-m "not slow") never starts them
SLOW_FIXTURES = {"ray_session", "ray_head", "vllm_server"}


def pytest_collection_modifyitems(config, items):
    unmarked = [i.nodeid for i in items if SLOW_FIXTURES & set(getattr(i, "fixturenames", ())) and not i.get_closest_marker("slow")]
    if unmarked:
        raise pytest.UsageError(f"these tests start Ray or a server but are not marked slow: {unmarked}")


@pytest.fixture(scope="session")
def ray_session():
    """An embedded Ray for the whole test session (stages call init_ray, which reuses it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory):
    """The bundled sample (6 tracks x clean + 4 degraded copies, plus 3 broken files)."""
    from pipeline.synth import SampleConfig, write_sample

    out = tmp_path_factory.mktemp("sample")
    write_sample(out, SampleConfig(tracks=6, seed=0))
    return out


@pytest.fixture(scope="session")
def caption_kit():
    """Tones, noise, quality rows, byte-level tokenizers and tiny (trained) CLAPs for the caption
    and CLAP tests: the helpers in tests/caption_kit.py, loaded from their file."""
    name = "mosaiq_tests_caption_kit"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "caption_kit.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
