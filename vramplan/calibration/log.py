"""The raw calibration log: one JSON object a line, appended atomically, read back tolerantly.

Durability: each record is serialised first, then written with a single ``os.write`` on a
descriptor opened ``O_APPEND`` and ``fsync``-ed before the runner moves on, so a crash or
Ctrl-C loses at most the point being measured. A crash in the middle of a write can only
leave a torn *last* line (no trailing newline): :func:`read_log` skips it with a warning and
:meth:`JsonlLog.open` cuts it off before appending again.

Record kinds (``"kind"``):

* ``session``: one per run of the runner: environment, versions, context probe.
* ``point``: a measured (or infeasible, or failed) configuration; ``status`` is ``ok``,
  ``oom`` or ``error``; ``split`` is ``fit``, ``holdout`` or ``search``.
* ``search``: the outcome of a largest-batch/seq search (probes are ``point`` records
  with ``search`` set to the search id).
* ``attempt``: written by the runner just before a point is measured (``id``, ``search``,
  ``size``); an attempt with no ``point`` record after it is a point that killed the process
  (``--resume`` skips it unless ``--retry-failed``). A point whose device stopped answering
  is recorded with ``status = "crashed"``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import VramplanError
from ..results import jsonable

LOG_FORMAT = 1


def _encode(record: dict) -> bytes:
    line = json.dumps(jsonable(record), sort_keys=False, separators=(",", ":"), allow_nan=False)
    if "\n" in line:  # json.dumps never emits raw newlines; guard the line protocol anyway
        raise ValueError("record serialises to more than one line")
    return (line + "\n").encode("utf-8")


class JsonlLog:
    """An append-only JSONL file. Use :meth:`open`; every :meth:`append` is durable on return."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def open(self) -> "JsonlLog":
        """Open for appending, holding an exclusive lock: one writer per log (a second gets a LockError)."""
        from ..validate import write_error

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(exc, self.path, "calibration log") from None
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - no flock (Windows): one writer is not enforced
            pass
        except OSError:
            os.close(fd)
            from ..errors import LockError

            raise LockError(f"another calibration is writing {self.path}",
                            "wait for it to finish, or use another --out directory") from None
        self._fd = fd
        repair_tail(self.path)
        return self

    def append(self, record: dict) -> None:
        """Write one record as one line and fsync it."""
        if self._fd is None:
            self.open()
        data = _encode({"log_format": LOG_FORMAT, **record})
        view = memoryview(data)
        try:
            while view:  # os.write may write less than asked on some filesystems
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError as exc:
            from ..validate import write_error

            if len(view) < len(data):  # a partial line: cut it so the log stays whole
                try:
                    repair_tail(self.path)
                except OSError:
                    pass
            raise write_error(exc, self.path, "calibration log") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlLog":
        return self.open() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.close()


def repair_tail(path: Path) -> bool:
    """Cut a torn last line (a crash mid-write) so appends start on a fresh line. True if cut."""
    if not path.exists():
        return False
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return False
        # find the last newline and truncate after it
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            chunk = fh.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                fh.truncate(start + nl + 1)
                break
            pos = start
        else:
            fh.truncate(0)
        fh.flush()
        os.fsync(fh.fileno())
    warnings.warn(f"{path}: removed a torn last line left by an interrupted write", stacklevel=2)
    return True


def iter_log(path: str | Path) -> Iterator[dict]:
    """Yield the records of a log; a torn last line is skipped, a corrupt middle line is an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise VramplanError(f"cannot read calibration log {path}: {exc.strerror or exc}") from None
    lines = raw.split(b"\n")
    torn = lines[-1] != b""
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except RecursionError:
            raise VramplanError(f"calibration log {path} is corrupt at line {i + 1} (nested too deeply)",
                                "remove that line, or move the log away and re-run") from None
        except ValueError:
            if i == len(lines) - 1 and torn:
                warnings.warn(f"{path}: skipping a torn last line (an interrupted write)", stacklevel=2)
                return
            raise VramplanError(f"calibration log {path} is corrupt at line {i + 1}",
                                "remove that line, or move the log away and re-run") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise VramplanError(f"calibration log {path}: line {i + 1} is not a record")
        yield rec


def read_log(path: str | Path) -> list[dict]:
    return list(iter_log(path))


@dataclass
class LogState:
    """What a log already holds, for ``--resume``."""

    sessions: list[dict] = field(default_factory=list)
    points: dict[str, dict] = field(default_factory=dict)      # grid points by id (last record wins)
    probes: dict[str, dict[int, dict]] = field(default_factory=dict)  # search id -> size -> record
    searches: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "LogState":
        st = cls()
        if not Path(path).exists():
            return st
        for rec in iter_log(path):
            kind = rec.get("kind")
            if kind == "session":
                st.sessions.append(rec)
            elif kind == "point":
                if rec.get("search"):
                    st.probes.setdefault(rec["search"], {})[int(rec["size"])] = rec
                else:
                    st.points[rec["id"]] = rec
            elif kind == "search":
                st.searches[rec["id"]] = rec
        return st

    def done(self, point_id: str) -> bool:
        """A point is done once measured or found infeasible; an ``error`` is retried on resume."""
        rec = self.points.get(point_id)
        return rec is not None and rec.get("status") in ("ok", "oom")

    @property
    def measured(self) -> int:
        return sum(1 for r in self.points.values() if r.get("status") in ("ok", "oom"))


def records(path: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    return [r for r in iter_log(path) if kind is None or r.get("kind") == kind]
