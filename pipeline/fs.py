"""Files: one layer for local paths and object storage, atomic writes, content digests and a
stage folder's parts, in one place.

Every location mosaiq reads or writes (stage folders, audio, shards, cards) goes through
`location()`: a local path or `file://` URL becomes a `pathlib.Path`; an `s3://`, `gs://` (or any
other fsspec) URL becomes a `upath.UPath` with the same methods (`/`, `.name`, `.open()`,
`.glob()`, `.exists()`...), built with the storage options of `set_storage_options` (a job
YAML's `storage_options:`) over what the usual environment variables give (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION; GOOGLE_APPLICATION_CREDENTIALS,
STORAGE_EMULATOR_HOST).

Every file mosaiq writes appears under its final name only once it is complete. On a disk it is
written under a hidden temporary name in the same folder (`.<name>.tmp-<pid>`) and renamed;
readers of a folder (pyarrow, pandas, Ray) skip names that start with `.` or `_`, so a killed
writer's leftover is never read as data, and `remove_temporaries` clears them. An object store
has no rename, but one upload is atomic (a single PUT, or a multipart upload that appears only
when completed): the file is written to a local temporary file and uploaded once complete, so a
killed writer leaves nothing under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

STORAGE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "memory")  # object stores mosaiq reads and writes
STORAGE_ENV = "MOSAIQ_STORAGE_OPTIONS"  # JSON {protocol: {option: value}}: how workers get them
_storage: dict[str, dict[str, Any]] = {}


# --- locations ---------------------------------------------------------------------------------


def protocol(loc) -> str:
    """'' for a local path or file:// URL, else the URL's scheme ('s3', 'gs', ...)."""
    s = os.fspath(loc) if not hasattr(loc, "protocol") else str(loc)
    if "://" not in s:
        return ""
    scheme = s.split("://", 1)[0].lower()
    return "" if scheme in ("file", "local") else scheme


def is_remote(loc) -> bool:
    return bool(protocol(loc))


def set_storage_options(options: dict[str, dict[str, Any]] | None) -> None:
    """Storage options by protocol (`{"s3": {"endpoint_url": ..., "key": ...}}`, as fsspec names
    them) for every location this process opens; kept in the environment too, so processes
    this one starts (Ray's workers on this node) see them."""
    _storage.clear()
    for proto, opts in (options or {}).items():
        if not isinstance(opts, dict):
            raise ValueError(f"storage_options.{proto} must be a mapping of fsspec options, got {opts!r}")
        _storage[str(proto)] = dict(opts)
    if _storage:
        os.environ[STORAGE_ENV] = json.dumps(_storage, sort_keys=True)
    else:
        os.environ.pop(STORAGE_ENV, None)


def storage_options() -> dict[str, dict[str, Any]]:
    """The storage options in force here: `set_storage_options`, else the environment's."""
    if not _storage and os.environ.get(STORAGE_ENV):
        try:
            _storage.update(json.loads(os.environ[STORAGE_ENV]))
        except ValueError as e:
            raise ValueError(f"{STORAGE_ENV} is not valid JSON: {e}") from None
    return _storage


# what S3 and GCS clients read; STORAGE_EMULATOR_HOST is gcsfs's endpoint for gs:// (a GCS
# emulator or another JSON API server): without it a task would open storage.googleapis.com
_CREDENTIAL_ENV = ("AWS_", "GOOGLE_", "GCSFS_", "FSSPEC_", "STORAGE_EMULATOR_HOST")


def storage_state() -> dict[str, Any]:
    """What a worker needs to open storage as this process does: the storage options and the
    storage clients' environment variables (credentials, endpoint, region)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(_CREDENTIAL_ENV)}
    return {"options": storage_options(), "env": env}


def storage_env() -> dict[str, str]:
    """`storage_state` as environment variables, for processes this one starts with an
    environment of their own (Ray Train's workers): the clients' variables and the options."""
    state = storage_state()
    env = dict(state["env"])
    if state["options"]:
        env[STORAGE_ENV] = json.dumps(state["options"], sort_keys=True)
    return env


def use_storage_state(state: dict[str, Any] | None) -> None:
    """In a Ray worker: open storage as the driver that sent `state` does (a worker started
    before the driver's environment was set, or on a node configured otherwise)."""
    if not state:
        return
    env = state.get("env") or {}
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.environ.update(env)
    if (state.get("options") or {}) != storage_options():
        set_storage_options(state.get("options"))


def _options_for(proto: str) -> dict[str, Any]:
    opts = dict(storage_options().get(proto, {}))
    if proto != "memory":
        # no listing cache: other processes (Ray tasks) add and remove objects, and resume,
        # cleanup and row accounting decide from what a listing shows now
        opts.setdefault("use_listings_cache", False)
    if proto in ("s3", "s3a") and "endpoint_url" not in opts and "client_kwargs" not in opts:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # botocore reads it too; s3fs's own HEAD/list calls need it explicitly
            opts["endpoint_url"] = endpoint
    if proto in ("gs", "gcs") and "endpoint_url" not in opts:
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        if emulator not in ("", "default"):  # gcsfs reads it too; a filesystem pickled to Ray Data's
            # read tasks (arrow_filesystem) needs it explicitly: they run without this environment
            opts["endpoint_url"] = emulator if "://" in emulator else f"http://{emulator}"
    return opts


def location(loc) -> Path:
    """A path object for `loc`: `pathlib.Path` on disk (file:// stripped), `upath.UPath` in
    object storage. Relative local paths stay relative (to the working directory)."""
    if hasattr(loc, "protocol") and getattr(loc, "protocol", "") not in ("", "file", "local"):
        return loc  # already a remote UPath
    s = os.fspath(loc)
    proto = protocol(s)
    if not proto:
        if "://" in s:
            s = s.split("://", 1)[1]
        return Path(s)
    if proto not in STORAGE_PROTOCOLS:
        raise ValueError(f"{s!r}: {proto}:// is not a storage mosaiq reads or writes; use a local path, "
                         f"file://, or one of {', '.join(p + '://' for p in STORAGE_PROTOCOLS)}")
    from upath import UPath

    try:
        return UPath(s, **_options_for(proto))
    except (ValueError, ImportError) as e:
        raise ValueError(f"{s!r}: cannot open {proto}:// locations ({e}); install the fsspec package "
                         f"for {proto} (s3fs for s3://, gcsfs for gs://)") from None


def absolute(loc) -> str:
    """The location as one canonical string: an absolute local path, or the URL without a
    trailing slash (what markers record and work is keyed by)."""
    p = location(loc)
    if is_remote(p):
        return str(p).rstrip("/")
    return os.path.abspath(p)


def join(loc, *names: str) -> str:
    return str(location(loc).joinpath(*names))


def filesystem(loc) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `loc`."""
    p = location(loc)
    if is_remote(p):
        return p.fs, p.path
    import fsspec

    return fsspec.filesystem("file"), os.path.abspath(p)


def arrow_filesystem(loc) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it): what pyarrow and Ray Data read with. Local paths go
    to pyarrow's own; object storage through the same fsspec filesystem as everything else."""
    import pyarrow.fs as pafs

    p = location(loc)
    if not is_remote(p):
        return pafs.LocalFileSystem(), os.path.abspath(p)
    import fsspec

    opts = _options_for(p.protocol)
    if p.protocol in ("s3", "s3a"):
        # Ray's read tasks get this filesystem pickled: it carries the credentials this process
        # has, as the tasks mosaiq starts carry `storage_state`
        for opt, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
            if opt not in opts and os.environ.get(var):
                opts[opt] = os.environ[var]
    return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(p.protocol, **opts))), p.path


def _read_parquet(reader, loc, **kwargs):
    """`reader(source)` on a local path, or on the object's file in object storage."""
    p = location(loc)
    if not is_remote(p):
        return reader(p, **kwargs)
    with p.open("rb") as f:
        return reader(f, **kwargs)


def read_table(loc, columns: list[str] | None = None) -> pa.Table:
    return _read_parquet(pq.read_table, loc, columns=columns)


def read_schema(loc) -> pa.Schema:
    return _read_parquet(pq.read_schema, loc)


def read_metadata(loc) -> pq.FileMetaData:
    return _read_parquet(pq.read_metadata, loc)


def size_and_mtime(loc) -> tuple[int, int | None]:
    """(size in bytes, modification time in ns or None where the store keeps none)."""
    p = location(loc)
    if not is_remote(p):
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    info = p.fs.info(p.path)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{str(p)!r} is a folder")
    mtime = info.get("LastModified") or info.get("mtime") or info.get("updated")
    ns = None
    if hasattr(mtime, "timestamp"):
        ns = int(mtime.timestamp() * 1e9)
    elif isinstance(mtime, (int, float)):
        ns = int(mtime * 1e9)
    elif isinstance(mtime, str):
        from datetime import datetime

        with contextlib.suppress(ValueError):
            ns = int(datetime.fromisoformat(mtime.replace("Z", "+00:00")).timestamp() * 1e9)
    return int(info.get("size") or 0), ns


def stamp(loc) -> str:
    """A cheap identity of a file or folder as it is now: each file's name (relative to the
    folder), size and modification time, digested; model weights replaced in place read as
    changed, as audio does. What does not exist is stamped by its name alone."""
    p = location(loc)
    if p.is_file():
        files = [(p.name, p)]
    elif p.is_dir():
        files = sorted((str(f.relative_to(p)), f) for f in p.rglob("*") if f.is_file())
    else:
        return f"{p}: missing"
    entries = []
    for name, f in files:
        size, mtime = size_and_mtime(f)
        entries.append(f"{name}:{size}:{mtime}")
    return text_digest("|".join(entries))


def rmtree(loc) -> None:
    """Remove a folder and everything under it; nothing if it is not there."""
    p = location(loc)
    if not is_remote(p):
        shutil.rmtree(p, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        p.fs.rm(p.path, recursive=True)


def check_reachable(loc, what: str = "location") -> None:
    """Raise a clear error naming `loc` when its bucket is missing, the credentials are refused
    or the endpoint does not answer: before any work starts, not half way through."""
    p = location(loc)
    if not is_remote(p):
        return
    bucket = p.path.split("/", 1)[0]
    try:
        p.fs.ls(bucket, refresh=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(p)!r}: bucket {bucket!r} does not exist") from None
    except PermissionError as e:
        raise PermissionError(f"{what} {str(p)!r}: access refused ({e}); check the credentials "
                              "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS "
                              "or storage_options)") from None
    except Exception as e:  # noqa: BLE001 - connection errors come in many types
        raise ValueError(f"{what} {str(p)!r}: cannot reach the object store ({type(e).__name__}: {e}); "
                         "check AWS_ENDPOINT_URL (STORAGE_EMULATOR_HOST for gs://) / storage_options.endpoint_url "
                         "and the network") from None


@contextlib.contextmanager
def local_file(loc) -> Iterator[str]:
    """A local path holding `loc`'s bytes, for libraries that read only by file name: the file
    itself on disk, a temporary download from object storage."""
    p = location(loc)
    if not is_remote(p):
        yield os.fspath(p)
        return
    fd, tmp = tempfile.mkstemp(prefix="mosaiq-", suffix=f"-{p.name}")
    os.close(fd)
    try:
        p.fs.get_file(p.path, tmp)
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
PART_GLOB = f"{PART_PREFIX}*{PART_SUFFIX}"
TMP_MARK = ".tmp-"  # in the name of every file still being written
PARQUET_COMPRESSION = "zstd"
_CHUNK = 1 << 20


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}{PART_SUFFIX}"


def list_parts(folder) -> list[Path]:
    """The `part-*.parquet` files of a stage folder, sorted; raises when there are none."""
    folder = location(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {str(folder)!r} does not exist")
    parts = sorted(folder.glob(PART_GLOB), key=lambda p: p.name)
    if not parts:
        raise FileNotFoundError(f"input folder {str(folder)!r} holds no {PART_GLOB} files")
    return parts


def tmp_path(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def _upload(tmp: str, target: Path) -> None:
    """One upload of a complete local file to its final name in object storage."""
    target.fs.put_file(tmp, target.path)


@contextlib.contextmanager
def atomic_target(path) -> Iterator[Path]:
    """A temporary path for a library that writes by file name (safetensors, matplotlib,
    soundfile); it becomes `path` on success (a rename on disk, one upload to object storage)
    and is removed on error."""
    path = location(path)
    if is_remote(path):
        tmpdir = tempfile.mkdtemp(prefix="mosaiq-up-")
        tmp = Path(tmpdir) / path.name
        try:
            yield tmp
            _upload(str(tmp), path)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file for `path`; on success it becomes `path`, on error it is removed."""
    with atomic_target(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def atomic_write_bytes(path, data: bytes) -> None:
    path = location(path)
    if is_remote(path):
        path.fs.pipe_file(path.path, data)  # one PUT
        return
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_table(table: pa.Table, path) -> None:
    """Write a Parquet file atomically (same table -> same bytes)."""
    atomic_write_bytes(path, table_bytes(table))


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes `atomic_write_table` writes for this table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes()


def write_if_changed(path, data: bytes) -> bool:
    """Write `data` atomically unless the file already holds exactly these bytes; True if written."""
    path = location(path)
    try:
        same = path.is_file() and size_and_mtime(path)[0] == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        same = False
    if same:
        return False
    atomic_write_bytes(path, data)
    return True


def remove_temporaries(folder) -> list[Path]:
    """Remove the temporary files that killed writers left in `folder` (not recursive). Object
    storage has none: an upload that did not complete leaves no object."""
    folder = location(folder)
    if is_remote(folder):
        return []
    gone = sorted(folder.glob(f".*{TMP_MARK}*")) if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def _digest_file(path, h) -> str:
    with location(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path, digest_size: int = 16) -> str:
    """blake2b of a file's bytes (128 bits by default), hex; read in chunks."""
    return _digest_file(path, hashlib.blake2b(digest_size=digest_size))


def sha256_file(path) -> str:
    return _digest_file(path, hashlib.sha256())


def derive_seed(text: str) -> int:
    """A 64-bit seed from a text (blake2b, little-endian): the one way mosaiq derives seeds from
    names, so a row's randomness depends on what it is, never on batching or order."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def text_digest(text: str, digest_size: int = 16) -> str:
    """blake2b of a text, hex (same size as `file_digest`)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=digest_size).hexdigest()


def write_parts(table: pa.Table, folder: str | Path, rows_per_part: int) -> list[Path]:
    """Split a table into `part-NNNNN.parquet` files of at most `rows_per_part` rows (at least
    one part, empty for an empty table). A part that already holds the same bytes is left as it
    is, so stages downstream see it unchanged."""
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part must be >= 1, got {rows_per_part}")
    folder = location(folder)
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(max(1, -(-table.num_rows // rows_per_part))):
        path = folder / part_name(i)
        write_if_changed(path, table_bytes(table.slice(i * rows_per_part, rows_per_part)))
        paths.append(path)
    return paths


# --- output folders that protect themselves ---------------------------------------------------

MARKER_FILE = "_mosaiq_stage.json"  # which stage wrote this folder, from which input
LOCK_FILE = "_mosaiq.lock"  # host and pid of the run writing this folder now
_held: dict[str, int] = {}  # lock files this process holds, with their nesting depth


class FolderError(ValueError):
    """An output folder this stage must not write (another stage's, its own input, locked)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take_lock(lock: Path) -> None:
    import socket
    import time

    key = str(lock)
    if key in _held:
        _held[key] += 1
        return
    host = socket.gethostname()
    body = json.dumps({"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    for _ in range(2):
        try:
            if is_remote(lock):
                # no exclusive create in an object store: the lock is advisory there (two runs
                # started within a round trip of each other can both take it)
                if lock.exists():
                    raise FileExistsError(str(lock))
                lock.fs.pipe_file(lock.path, body.encode())
            else:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(body)
        except FileExistsError:
            try:
                held = json.loads(lock.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError):
                held = {}
            if held.get("host") == host and isinstance(held.get("pid"), int) and not _pid_alive(held["pid"]):
                lock.unlink(missing_ok=True)  # stale: its run is gone
                continue
            raise FolderError(
                f"{lock.parent} is being written by another run (host {held.get('host', '?')}, pid "
                f"{held.get('pid', '?')}, since {held.get('since', '?')}); if no such run is going, remove {lock}"
            ) from None
        _held[key] = 1
        return
    raise FolderError(f"could not lock {lock.parent}")


def _release_lock(lock: Path) -> None:
    key = str(lock)
    _held[key] -= 1
    if _held[key] == 0:
        del _held[key]
        lock.unlink(missing_ok=True)


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


@contextlib.contextmanager
def stage_output(stage: str, input_path, output_dir) -> Iterator[Path]:
    """Claim `output_dir` for `stage` while the block runs.

    Refuses (FolderError) an output that is the stage's input or holds it, a folder another
    stage wrote, a folder that holds files but no mosaiq marker, and a folder another run is
    writing (a lock with host and pid; a lock whose process is gone is taken over). The marker
    `_mosaiq_stage.json` names the stage and its input. An object-store output is checked for
    reachability (bucket, credentials, endpoint) first.
    """
    out_s, inp_s = absolute(output_dir), absolute(input_path)
    if _within(inp_s, out_s):
        raise FolderError(f"{stage}: the output folder {out_s!r} is (or holds) the stage's input {inp_s!r}; choose another output")
    check_reachable(out_s, f"{stage} output")
    out = location(out_s)
    marker = out / MARKER_FILE
    if marker.is_file():
        try:
            claimed = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            claimed = {}
        if claimed.get("stage") != stage:
            raise FolderError(f"{stage}: {out_s!r} holds the output of stage {claimed.get('stage', '?')!r}; "
                              "choose another output folder")
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise FolderError(f"{stage}: {out_s!r} holds files that mosaiq did not write (no {MARKER_FILE}); "
                          "choose a new or empty output folder")
    if not is_remote(out):
        out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    _take_lock(lock)
    try:
        if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")).get("input") != inp_s:
            atomic_write_text(marker, json.dumps({"stage": stage, "input": inp_s}, indent=2, sort_keys=True) + "\n")
        yield out
    finally:
        _release_lock(lock)
