"""Dataclasses' generated methods compiled once per command and kept beside the bytecode (start-up).

:mod:`dataclasses` writes each class's ``__init__``, ``__repr__`` and ``__eq__`` (a frozen class's
``__setattr__``, ``__delattr__`` and ``__hash__`` too) as source text and compiles it with ``exec``
every time the class is created, that is at every import: Python keeps a module's bytecode between
runs, not these methods'. ``vramplan fit`` creates about 90 dataclasses (vramplan's own, and rich's
for the table) and compiling their ~460 methods is ~14% of the command's instructions (CPython 3.11,
``benchmarks/cli_speed.py --instructions``: 2,658M -> 2,295M for ``fit --json``).

:func:`compiled_dataclass_methods`, entered by the command line's entry point only
(:mod:`vramplan.__main__`; ``import vramplan`` as a library changes nothing), gives the
:mod:`dataclasses` module its own ``exec`` (:meth:`MethodCode.exec`) while the command runs: a source
text it has compiled before runs as that code object, read from a marshal file beside vramplan's
bytecode (one per subcommand, :func:`cache_file`); a text it has not seen is compiled as ``exec``
would compile it, and the file is rewritten at the end of the command. The whole text is the key, so
an edited class (a field added, a default changed) is a new text, compiled afresh; nothing is
invalidated by hand and nothing can collide. The code object is the one ``exec`` makes of the same
text: the same file name (``"<string>"``), the interpreter's optimisation level (the file's name
holds it) and the ``__future__`` flags of :mod:`dataclasses`' own code, which ``exec`` passes on
(:data:`FUTURE_FLAGS`), so the classes are the same to the byte (``tests/test_dataclass_code.py``
compares their methods' code objects).

As with bytecode, nothing is written where ``sys.dont_write_bytecode`` is set (a file already there
is still read); a file that is missing, unreadable, truncated or of another format is ignored (and
replaced once something is compiled); the write is atomic (:func:`vramplan._data.write_marshal_atomically`).
"""

from __future__ import annotations

import __future__
import builtins
import dataclasses
import marshal
import sys
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ._data import beside_bytecode, write_marshal_atomically

#: The ``__future__`` flags of :mod:`dataclasses`' own code: what ``exec(text)`` called from there compiles with.
FUTURE_FLAGS = dataclasses.fields.__code__.co_flags & sum(
    getattr(__future__, name).compiler_flag for name in __future__.all_feature_names)
#: The most texts one cache file keeps: beyond it, a rewrite keeps only the texts of the command that writes
#: it (the file never grows without end as classes are edited).
MAX_TEXTS = 4096


def cache_file(command: str | None) -> Path | None:
    """The marshal file of ``command``'s classes' methods, beside vramplan's bytecode (:func:`vramplan._data.beside_bytecode`);
    the optimisation level (``-O``) is in its name. ``command``: a subcommand's name (None: no subcommand)."""
    opt = f".opt-{sys.flags.optimize}" if sys.flags.optimize else ""
    return beside_bytecode(Path(__file__).resolve().parent, f"dataclasses-{command or 'none'}.{{tag}}{opt}.marshal")


class MethodCode:
    """The code objects of the dataclass methods one command creates, by their source text.

    Attributes:
        path: the marshal file read and written (None: nothing is kept).
        known: text -> code object, as read from the file.
        used: text -> code object of every text this command has run.
        compiled: how many texts this command compiled (0: the file held every one).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.known = read_code(path)
        self.used: dict[str, types.CodeType] = {}
        self.compiled = 0

    def exec(self, source, globals=None, locals=None) -> None:  # noqa: A002 - exec's own parameter names
        """``exec(source, globals, locals)``, with a source text run as its compiled code object."""
        if type(source) is str:
            code = self.used.get(source) or self.known.get(source)
            if code is None:
                code = compile(source, "<string>", "exec", flags=FUTURE_FLAGS, dont_inherit=True)
                self.compiled += 1
            self.used[source] = code
            source = code
        builtins.exec(source, globals, locals)

    def save(self) -> None:
        """Rewrite the file when this command compiled anything: the texts it read and those it used, or only
        those it used once there would be more than :data:`MAX_TEXTS`."""
        if not self.compiled or self.path is None or sys.dont_write_bytecode:
            return
        keep = dict(self.known) if len(self.known) + len(self.used) <= MAX_TEXTS else {}
        keep.update(self.used)
        write_marshal_atomically(self.path, keep)


def read_code(path: Path | None) -> dict[str, types.CodeType]:
    """The text -> code object table in ``path``; empty where it is missing, unreadable or not such a table."""
    if path is None:
        return {}
    try:
        table = marshal.loads(path.read_bytes())
    except Exception:  # noqa: BLE001 - missing, unreadable, truncated or another interpreter's: compile instead
        return {}
    if not isinstance(table, dict):
        return {}
    return {t: c for t, c in table.items() if type(t) is str and type(c) is types.CodeType}


@contextmanager
def compiled_dataclass_methods(command: str | None) -> Iterator[MethodCode]:
    """While the block runs, :mod:`dataclasses` compiles each method text once across runs (module docstring).

    Restores what :mod:`dataclasses` had before on the way out (an exception included), then writes the
    file if anything was compiled.
    """
    code = MethodCode(cache_file(command))
    namespace = vars(dataclasses)
    missing = object()
    before = namespace.get("exec", missing)
    namespace["exec"] = code.exec
    try:
        yield code
    finally:
        if namespace.get("exec") == code.exec:
            if before is missing:
                del namespace["exec"]
            else:
                namespace["exec"] = before
        code.save()
