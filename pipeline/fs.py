"""Files: atomic writes, content digests and a stage folder's parts, in one place.

Every file mosaiq writes appears under its final name only once it is complete: it is written
under a hidden temporary name in the same folder (`.<name>.tmp-<pid>`) and renamed. Readers of
a folder (pyarrow, pandas, Ray) skip names that start with `.` or `_`, so a killed writer's
leftover is never read as data; `remove_temporaries` clears them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import IO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
PART_GLOB = f"{PART_PREFIX}*{PART_SUFFIX}"
TMP_MARK = ".tmp-"  # in the name of every file still being written
PARQUET_COMPRESSION = "zstd"
_CHUNK = 1 << 20


def part_name(index: int) -> str:
    return f"{PART_PREFIX}{index:05d}{PART_SUFFIX}"


def list_parts(folder: str | Path) -> list[Path]:
    """The `part-*.parquet` files of a stage folder, sorted; raises when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder {str(folder)!r} does not exist")
    parts = sorted(folder.glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"input folder {str(folder)!r} holds no {PART_GLOB} files")
    return parts


def tmp_path(path: Path) -> Path:
    """The hidden temporary name a file is written under before it is renamed to `path`."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_target(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a library that writes by file name (safetensors,
    matplotlib); renamed to `path` on success, removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_table(table: pa.Table, path: str | Path) -> None:
    """Write a Parquet file atomically (same table -> same bytes)."""
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f, compression=PARQUET_COMPRESSION)


def table_bytes(table: pa.Table) -> bytes:
    """The Parquet bytes `atomic_write_table` writes for this table."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes()


def write_if_changed(path: str | Path, data: bytes) -> bool:
    """Write `data` atomically unless the file already holds exactly these bytes; True if written."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    atomic_write_bytes(path, data)
    return True


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers left in `folder` (not recursive)."""
    folder = Path(folder)
    gone = sorted(folder.glob(f".*{TMP_MARK}*")) if folder.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def file_digest(path: str | Path, digest_size: int = 16) -> str:
    """blake2b of a file's bytes (128 bits by default), hex; read in chunks."""
    h = hashlib.blake2b(digest_size=digest_size)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
    folder = Path(folder)
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
    import json
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
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
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
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(body)
        _held[key] = 1
        return
    raise FolderError(f"could not lock {lock.parent}")


def _release_lock(lock: Path) -> None:
    key = str(lock)
    _held[key] -= 1
    if _held[key] == 0:
        del _held[key]
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def stage_output(stage: str, input_path: str | Path, output_dir: str | Path) -> Iterator[Path]:
    """Claim `output_dir` for `stage` while the block runs.

    Refuses (FolderError) an output that is the stage's input or holds it, a folder another
    stage wrote, a folder that holds files but no mosaiq marker, and a folder another run is
    writing (a lock with host and pid; a lock whose process is gone is taken over). The marker
    `_mosaiq_stage.json` names the stage and its input.
    """
    import json

    out = Path(os.path.abspath(output_dir))
    inp = Path(os.path.abspath(input_path))
    if out == inp or out in inp.parents:
        raise FolderError(f"{stage}: the output folder {str(out)!r} is (or holds) the stage's input {str(inp)!r}; choose another output")
    marker = out / MARKER_FILE
    if marker.is_file():
        try:
            claimed = json.loads(marker.read_text(encoding="utf-8"))
        except ValueError:
            claimed = {}
        if claimed.get("stage") != stage:
            raise FolderError(f"{stage}: {str(out)!r} holds the output of stage {claimed.get('stage', '?')!r}; "
                              "choose another output folder")
    elif out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise FolderError(f"{stage}: {str(out)!r} holds files that mosaiq did not write (no {MARKER_FILE}); "
                          "choose a new or empty output folder")
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    _take_lock(lock)
    try:
        if not marker.is_file() or json.loads(marker.read_text(encoding="utf-8")).get("input") != str(inp):
            atomic_write_text(marker, json.dumps({"stage": stage, "input": str(inp)}, indent=2, sort_keys=True) + "\n")
        yield out
    finally:
        _release_lock(lock)
