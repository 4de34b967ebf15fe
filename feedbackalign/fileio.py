"""Files that survive crashes and full disks: atomic writes (swapped in with the mode the umask gives), durable
appends, JSON Lines with a torn last line cut off, and the one place where a lack of disk space becomes a one-line
error naming the path and the bytes needed (checkpoints, the reference cache, samples, metrics all go through
`reporting_full_disk`).

Written by hand because the pieces exist (tempfile, os.replace, os.fsync, shutil.disk_usage) but not the policy,
and because the writers we call report a full disk without an errno: torch.save's zip writer raises
"unexpected pos ...", SQLite "database or disk is full". So a failed write is judged by the errno, the message,
or, failing both, by the filesystem being full once it failed.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import shutil
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from feedbackalign.errors import DataError, EnvError

OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
OUT_OF_SPACE_WORDS = ("no space left", "disk is full", "disk quota")
NEARLY_FULL = 1 << 20  # bytes: a write that failed with less than this left free failed for lack of space


# ---------------------------------------------------------------- space


def free_bytes(path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that holds (or will hold) `path`."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human_bytes(n: float) -> str:
    """Decimal units, as `df -H` and disk vendors count: 62.9 MB, 1.2 GB."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def has_space(path, needed: int) -> bool:
    return free_bytes(path) >= needed


def out_of_space(path, needed: int, what: str, hint: str, while_writing: bool = False) -> EnvError:
    """The one-line error: which path, how much the write needed, how much is free, what to do."""
    free = human_bytes(free_bytes(path))
    state = f"at least {human_bytes(needed)} and the disk filled up while writing it ({free} free now)" \
        if while_writing else f"{human_bytes(needed)}, {free} free"
    return EnvError(f"no space left on the device of {path} for the {what}: it needs {state}; {hint}")


def _chain(error: BaseException):
    """The error, its causes and contexts, and the errors it gathers (an ExceptionGroup's, or the per-rank
    `failures` of torch.distributed.checkpoint's CheckpointException)."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)  # DCP: {rank: (exception, traceback summary)}
        gathered = [v[0] if isinstance(v, tuple) else v for v in failures.values()] \
            if isinstance(failures, dict) else []
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ()),
                 *(v for v in gathered if isinstance(v, BaseException))]


def is_out_of_space(error: BaseException, path) -> bool:
    """Whether a failed write under `path` failed for lack of space (errno, message, or a now-full filesystem)."""
    errors = list(_chain(error))
    for e in errors:
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE_ERRNOS:
            return True
        if any(word in str(e).lower() for word in OUT_OF_SPACE_WORDS):
            return True
    if not any(isinstance(e, (OSError, RuntimeError)) for e in errors):
        return False
    try:
        return free_bytes(path) < NEARLY_FULL
    except OSError:
        return False


@contextmanager
def reporting_full_disk(path, *, needed: int, what: str, hint: str,
                        cleanup: Optional[Callable[[], None]] = None):
    """Write about `needed` bytes under `path` inside the block: refused up front (EnvError, nothing written)
    when fewer are free; a write inside that fails for lack of space becomes the same one-line EnvError.
    `cleanup` (e.g. removing a half-written temporary) runs on any failure, after the space is judged."""
    if not has_space(path, needed):
        raise out_of_space(path, needed, what, hint)
    try:
        yield
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        full = not isinstance(e, EnvError) and is_out_of_space(e, path)
        if full:  # release what the failed writer still holds open (torch.save's file), so cleanup frees it
            for error in _chain(e):
                traceback.clear_frames(error.__traceback__)
            gc.collect()
        if cleanup is not None:
            cleanup()
        if full:
            raise out_of_space(path, needed, what, hint, while_writing=True) from None
        raise


# ---------------------------------------------------------------- writes


def umask() -> int:
    """The process's umask (read by setting it and putting it back: POSIX has no other way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open` gives a new file under the user's umask (samples and reports stay group-readable
    when the umask says so; temporaries from `tempfile` are 0600 until swapped into place)."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


def make_temporary_folder(parent: Path, prefix: str) -> Path:
    """A new folder in `parent` to build something in and swap into place, with the umask's mode."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, folder_mode())
    return folder


def fsync_dir(path) -> None:
    """Make a rename or a new file in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path, data: bytes, *, what: str = "file", hint: str = "free space, then rerun") -> None:
    """Write `data` to a temporary file beside `path`, fsync it, os.replace it into place and fsync the directory:
    a crash leaves the old file or the new one, never a mix; a full disk leaves the old one and an EnvError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None

    def remove_tmp():
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)

    with reporting_full_disk(path, needed=len(data), what=what, hint=hint, cleanup=remove_tmp):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())  # mkstemp makes it 0600; the file in place gets what `open` would give
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)


def write_json_atomic(path, obj, *, what: str = "file", hint: str = "free space, then rerun") -> None:
    """Indented JSON, written atomically (write_bytes_atomic)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), what=what, hint=hint)


def append_line(path, line: str, *, what: str, hint: str) -> None:
    """Append one line, flushed and fsync'd before returning: a crash or a power loss keeps every line this
    returned for (at most the line being written is torn; `read_json_lines` drops it)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    path = Path(path)
    with reporting_full_disk(path, needed=len(data), what=what, hint=hint):
        with open(path, "ab") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def read_json_lines(path) -> tuple[list[dict], bool]:
    """(records, torn) of a JSON Lines file written by `append_line`. A torn last line (no newline and not a
    complete record, or the zero bytes a crash can leave) is dropped and reported as torn=True; a bad line
    before it is a DataError naming the file and line."""
    data = Path(path).read_bytes()
    end = data.rfind(b"\n") + 1
    body, raw_tail = data[:end], data[end:]
    tail = raw_tail.strip(b"\0 \r\t")
    records = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        line = line.strip(b"\0 \r\t")
        if not line:
            continue
        record = _json_object(line)
        if record is None:
            raise DataError(f"{path} line {number} is not a JSON object: delete that line (or the file) and rerun")
        records.append(record)
    record = _json_object(tail) if tail else None
    if record is not None:
        records.append(record)  # complete, only its newline lost
    return records, bool(raw_tail) and record is None


def _json_object(line: bytes) -> Optional[dict]:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
