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
# gs:// is tested against a local emulator (gcs_server below). gcsfs's experimental zonal and
# hierarchical bucket support asks each bucket's type over gRPC, which an emulator does not serve
# (a minute of retries per bucket with anonymous access); gcsfs reads this when it is imported, so
# it is set before any process (this one, the embedded Ray's workers) imports it
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


# fixtures that start Ray, a Ray cluster or a server: a test that uses one must be marked slow,
# so `make test-fast` (-m "not slow") never starts them
SLOW_FIXTURES = {"ray_session", "ray_head", "ray_two_nodes", "vllm_server"}


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


# --- a real Ray cluster started with `ray start` (the way users start one) ---------------------

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(temp_dir: str) -> None:
    """Stop only the processes of the cluster under `temp_dir` (`ray stop` would also stop
    every other Ray on the machine, this test session's own embedded one included)."""
    import psutil

    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in (p.info["cmdline"] or [])):
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _ray_start(args: list[str], env: dict) -> None:
    import subprocess

    proc = subprocess.run([str(VENV_BIN / "ray"), "start", "--disable-usage-stats", *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _node_ports() -> list[str]:
    # every port explicit and free: other Ray instances on this machine hold the defaults
    # (a busy default agent port leaves the head with "No available agent to submit job")
    flags = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
             "--node-manager-port", "--object-manager-port", "--runtime-env-agent-port")
    return [a for flag in flags for a in (flag, str(free_port()))]


@contextlib.contextmanager
def ray_cluster(head_cpus: int, worker_cpus: tuple[int, ...] = ()):
    """A head (`ray start --head`) and worker nodes (`ray start --address`), each in its own temp
    dir (its own session, logs and object spilling: nothing shared but the machine). Yields the
    dashboard address for `ray job submit`, the environment, and the GCS address."""
    import shutil
    import tempfile

    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    dirs = [tempfile.mkdtemp(prefix="rayn", dir="/tmp") for _ in range(1 + len(worker_cpus))]  # short: socket paths
    gcs, dash = free_port(), free_port()
    try:
        _ray_start(["--head", "--num-cpus", str(head_cpus), "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--ray-client-server-port", str(free_port()),
                    "--temp-dir", dirs[0], *_node_ports()], env)
        for cpus, d in zip(worker_cpus, dirs[1:]):
            _ray_start(["--address", f"127.0.0.1:{gcs}", "--num-cpus", str(cpus), "--temp-dir", d, *_node_ports()], env)
        yield f"http://127.0.0.1:{dash}", env, f"127.0.0.1:{gcs}"
    finally:
        for d in dirs:
            kill_cluster(d)
        kill_cluster(f"127.0.0.1:{gcs}")  # worker raylets name the head's address
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture()
def ray_head():
    """A real Ray head started with `ray start --head` in its own temp dir, stopped afterwards."""
    with ray_cluster(2) as (dashboard, env, _):
        yield dashboard, env


@pytest.fixture()
def ray_two_nodes():
    """A head with no CPUs (it runs the job's driver only) and a second node with 2 CPUs, both
    started with `ray start` on this machine: every task of a stage runs on the second node."""
    with ray_cluster(0, (2,)) as cluster:
        yield cluster


# --- a real S3 server (moto's server mode) on 127.0.0.1 ----------------------------------------

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on 127.0.0.1 for the session; the environment variables every
    S3 client reads (this process and the ones it starts) point at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def bucket_name(request) -> str:
    """A new bucket name for this test: its name in the characters buckets allow, and a nonce."""
    import re
    import uuid

    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A new, empty bucket on the session's S3 server: its `s3://` URL."""
    import fsspec

    name = bucket_name(request)
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}"


# --- a GCS emulator (gcp-storage-emulator, in this process) on 127.0.0.1 -----------------------


@pytest.fixture(scope="session")
def gcs_server():
    """A GCS (JSON API) emulator on 127.0.0.1 for the session, objects in memory;
    STORAGE_EMULATOR_HOST, which gcsfs reads, points at it (this process and those it starts later)."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    try:
        yield os.environ["STORAGE_EMULATOR_HOST"]
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        server.stop()  # shuts its HTTP server down: its thread ends, the port is closed


@pytest.fixture()
def gcs_bucket(gcs_server, request):
    """A new, empty bucket on the session's GCS emulator: its `gs://` URL. Anonymous access
    (`token: anon`) is set as a job YAML's `storage_options` would set it, for this test: the
    driver and every task it starts open gs:// with it, never looking for Google credentials."""
    import fsspec

    from pipeline import fs

    name = bucket_name(request)
    fsspec.filesystem("gs", token="anon", skip_instance_cache=True).mkdir(name)
    saved = {k: dict(v) for k, v in fs.storage_options().items()}
    fs.set_storage_options({**saved, "gs": {**saved.get("gs", {}), "token": "anon"}})
    try:
        yield f"gs://{name}"
    finally:
        fs.set_storage_options(saved)
