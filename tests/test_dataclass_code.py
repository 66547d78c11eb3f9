"""The command line's cache of dataclasses' generated methods (vramplan._dataclass_code): the same classes, once compiled.

Every test runs with its own ``sys.pycache_prefix`` (a temporary directory), so that nothing is read from or
written beside the checkout's bytecode.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import subprocess
import sys
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from vramplan import _dataclass_code
from vramplan._dataclass_code import cache_file, compiled_dataclass_methods

ROOT = Path(__file__).resolve().parents[1]
#: the methods dataclasses may generate
METHODS = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "__lt__", "__le__", "__gt__",
           "__ge__")


@pytest.fixture(autouse=True)
def own_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pyc"))
    monkeypatch.setattr(sys, "dont_write_bytecode", False)


def make_classes() -> list[type]:
    """A fresh set of dataclasses of every kind the generator writes differently (new class objects each call)."""
    @dataclass
    class Plain:
        a: int
        b: str = "x"
        c: list = field(default_factory=list)
        d: ClassVar[int] = 3

    @dataclass(frozen=True)
    class Frozen:
        a: int
        b: tuple = (1, 2)

    @dataclass(order=True, unsafe_hash=True)
    class Ordered:
        a: int
        b: float = 0.5
        hidden: int = field(default=0, init=False, repr=False, compare=False)

    @dataclass(kw_only=True)
    class KwOnly:
        a: int
        b: "dict[str, int] | None" = None

    @dataclass
    class WithInitVar:
        a: int
        scale: InitVar[int] = 2

        def __post_init__(self, scale):
            self.a *= scale

    @dataclass(frozen=True)
    class Child(Frozen):
        c: int = 0

    @dataclass(slots=True)
    class Slotted:
        a: int
        b: int = 1

    return [Plain, Frozen, Ordered, KwOnly, WithInitVar, Child, Slotted]


def _exercise(classes: list[type]) -> list:
    """What the classes do, as comparable values."""
    Plain, Frozen, Ordered, KwOnly, WithInitVar, Child, Slotted = classes
    out = [repr(Plain(1)), Plain(1) == Plain(1), Plain(1) == Plain(2), repr(Frozen(1)), hash(Frozen(1)) == hash(Frozen(1)),
           Ordered(1) < Ordered(2), Ordered(1, 0.1) <= Ordered(1, 0.2), repr(KwOnly(a=1)), WithInitVar(3).a,
           repr(Child(1, (3,), 4)), repr(Slotted(5)), Slotted.__slots__]
    with pytest.raises(dataclasses.FrozenInstanceError):
        Frozen(1).a = 2
    with pytest.raises(TypeError):
        KwOnly(1)
    return out


def _methods(classes: list[type]) -> dict:
    return {(c.__name__, m): vars(c)[m] for c in classes for m in METHODS if m in vars(c)}


def _assert_same_methods(ref: list[type], got: list[type]) -> None:
    a, b = _methods(ref), _methods(got)
    assert a.keys() == b.keys()
    for key, f in a.items():
        g = b[key]
        if f is None or not hasattr(f, "__code__"):  # __hash__ = None, object's own
            assert f == g, key
            continue
        assert g.__code__ == f.__code__, key  # the bytecode, constants, names, flags, line table
        assert marshal.dumps(g.__code__) == marshal.dumps(f.__code__), key
        assert g.__qualname__ == f.__qualname__, key
        assert g.__defaults__ == f.__defaults__ and g.__kwdefaults__ == f.__kwdefaults__, key
        assert {k: repr(v) for k, v in g.__annotations__.items()} == {k: repr(v) for k, v in f.__annotations__.items()}, key


def test_the_same_methods_as_dataclasses_compiles():
    """Compiled through the cache (cold, then read back from its file), every generated method is the code object
    ``exec`` makes of the same text: this module's ``from __future__ import annotations`` does not leak into it."""
    ref = make_classes()
    with compiled_dataclass_methods("test") as cold:
        first = make_classes()
    assert cold.compiled > 0 and cache_file("test").exists()
    with compiled_dataclass_methods("test") as warm:
        second = make_classes()
    assert warm.compiled == 0 and warm.used.keys() == cold.used.keys()
    for got in (first, second):
        _assert_same_methods(ref, got)
        assert _exercise(got) == _exercise(ref)


def test_dataclasses_is_left_as_it_was():
    assert "exec" not in vars(dataclasses)
    with pytest.raises(RuntimeError):
        with compiled_dataclass_methods("test"):
            assert vars(dataclasses)["exec"] is not None
            make_classes()
            raise RuntimeError("a command that fails")
    assert "exec" not in vars(dataclasses)
    assert cache_file("test").exists()  # what it compiled before failing is kept


def test_broken_or_foreign_files_are_ignored_and_replaced():
    path = cache_file("test")
    path.parent.mkdir(parents=True, exist_ok=True)
    for blob in (b"", b"\x00garbage", marshal.dumps([1, 2]), marshal.dumps({"def f(): pass": "not code", 3: 4})):
        path.write_bytes(blob)
        with compiled_dataclass_methods("test") as code:
            _assert_same_methods(make_classes(), make_classes())
        assert code.compiled > 0
        table = marshal.loads(path.read_bytes())
        assert set(table) == set(code.used) and all(type(c) is type(test_broken_or_foreign_files_are_ignored_and_replaced.__code__)
                                                    for c in table.values())


def test_nothing_written_without_bytecode(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with compiled_dataclass_methods("test") as code:
        make_classes()
    assert code.compiled > 0 and not cache_file("test").exists()


def test_a_full_file_keeps_only_the_command_s_texts(monkeypatch):
    path = cache_file("test")
    stale = {f"def __create_fn__():\n def f{i}(): pass\n return f{i}": compile("pass", "<string>", "exec")
             for i in range(5)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(marshal.dumps(stale))
    with compiled_dataclass_methods("test") as code:  # room for all: the stale texts stay
        make_classes()
    assert set(marshal.loads(path.read_bytes())) == set(stale) | set(code.used)
    monkeypatch.setattr(_dataclass_code, "MAX_TEXTS", len(code.used) + 2)
    path.write_bytes(marshal.dumps(stale))
    with compiled_dataclass_methods("test") as code:
        make_classes()
    assert set(marshal.loads(path.read_bytes())) == set(code.used)


def test_one_file_per_command_and_optimisation_level():
    assert cache_file("fit") != cache_file("estimate") != cache_file(None)
    assert cache_file("fit").name.startswith("dataclasses-fit.") and sys.implementation.cache_tag in cache_file("fit").name


def test_the_program_compiles_nothing_on_its_second_run(tmp_path):
    """``vramplan`` (the entry point) writes its command's file on the first run and only reads it on the next."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "run"), "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cmd = [sys.executable, "-c", "import sys; sys.argv = ['vramplan', 'estimate', '--model', '1b', '--method', 'lora', "
           "'--json']; from vramplan.__main__ import main; sys.exit(main())"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    files = list((tmp_path / "run").rglob("dataclasses-estimate.*.marshal"))
    assert len(files) == 1
    before = files[0].stat().st_mtime_ns, files[0].read_bytes()
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert (files[0].stat().st_mtime_ns, files[0].read_bytes()) == before  # nothing compiled: not rewritten
    assert len(marshal.loads(before[1])) > 50  # vramplan's classes' methods
