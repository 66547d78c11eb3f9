"""The one validation layer at the edge: every value from a user is checked here, once.

The CLI (``type=`` functions of argparse), the Python API (:func:`vramplan.estimate`,
:func:`vramplan.fit`, :func:`vramplan.config.make_config`, the matrix) and the file readers
(configs, trainer YAML, ``config.json``) call these helpers, so library code below them never
sees a NaN, a string where a number belongs, an absurd size, a binary file or a blocking
special file. Every failure is an :class:`~vramplan.errors.InputError` (a
:class:`~vramplan.errors.VramplanError`): one line, with a hint, exit code 2 on the CLI.

Bounds (``LIMITS``) are sanity limits, far above any real training run, that keep integer
arithmetic, grids and allocations finite: a sequence of at most 16M tokens, a micro-batch of
at most 1M examples, and so on. They are not claims about what fits.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import FileError, InputError, VramplanError, WriteError

#: Sanity bounds on user numbers (inclusive upper limits).
LIMITS = {
    "seq": 1 << 24,            # 16M tokens per sequence
    "batch": 1 << 20,          # 1M examples per micro-batch
    "grad-accum": 1 << 20,     # 1M accumulation steps
    "global-batch": 1 << 30,
    "rank": 1 << 16,           # LoRA rank
    "gpus": 1 << 16,           # GPUs in one job
    "ppo-response": 1 << 24,
    "top": 10_000,
    "epochs": 1e6,
    "tokens": 1e18,            # dataset tokens per epoch
    "alpha": 1e6,
    "time-limit": 1e7,         # seconds (~4 months)
}
#: Largest user text file read (config.json, Axolotl/TRL YAML, suite TOML, preamble): 8 MiB.
MAX_TEXT_BYTES = 8 << 20
#: Largest YAML document after alias expansion, in nodes (a 578-byte "billion laughs" expands to 10^9).
MAX_YAML_NODES = 200_000
#: Deepest nesting accepted in JSON/TOML/YAML documents.
MAX_DEPTH = 100
#: A largest device capacity accepted for ``--gpu-mem`` and matrix capacities (1 PiB).
MAX_CAPACITY = 1 << 50
#: Regex bounds for PEFT ``target_modules`` strings (see :func:`target_regex`).
MAX_REGEX_LEN = 256
MAX_REGEX_UNBOUNDED = 4


# -- scalars ---------------------------------------------------------------------------------

def _flag_name(name: str) -> str:
    return name if name.startswith("-") or " " in name or ":" in name else f"--{name.replace('_', '-')}"


def integer(value: Any, name: str, *, lo: int = 1, hi: int | None = None, none_ok: bool = False) -> int | None:
    """``value`` as an ``int`` in ``lo..hi`` (``hi`` defaults to ``LIMITS[name]``); numpy ints accepted.

    Raises:
        InputError: a bool, float, string, NaN, or an integer out of range.
    """
    if value is None and none_ok:
        return None
    label = _flag_name(name)
    key = label.lstrip("-")
    hi = LIMITS.get(key) if hi is None else hi
    if isinstance(value, bool) or not _is_int(value):
        kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise InputError(f"{label} must be {kind}, got {_show(value)}", _range_hint(lo, hi))
    v = int(value)
    if v < lo:
        kind = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise InputError(f"{label} must be {kind}, got {_num(v)}", _range_hint(lo, hi))
    if hi is not None and v > hi:
        raise InputError(f"{label} must be at most {_num(hi)}, got {_num(v)}", "a sanity bound far above real runs")
    return v


def real(value: Any, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, none_ok: bool = False) -> float | None:
    """``value`` as a finite ``float`` within the bounds (``hi`` defaults to ``LIMITS[name]``).

    Raises:
        InputError: not a real number (bool, string, None), NaN or infinite, or out of range.
    """
    if value is None and none_ok:
        return None
    label = _flag_name(name)
    hi = LIMITS.get(label.lstrip("-")) if hi is None else hi
    if isinstance(value, bool) or not (_is_int(value) or _is_float(value)):
        raise InputError(f"{label} must be a number, got {_show(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise InputError(f"{label} is too large: {_show(value)}") from None
    if not math.isfinite(v):
        raise InputError(f"{label} must be a finite number, got {_show(value)}")
    if lo is not None and (v < lo or (lo_open and v == lo)) or hi is not None and (v > hi or (hi_open and v == hi)):
        lo_t = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
        hi_t = "" if hi is None else (f"< {hi:g}" if hi_open else f"<= {hi:g}")
        raise InputError(f"{label} must be {' and '.join(t for t in (lo_t, hi_t) if t)}, got {_show(value)}")
    return v


def flag(value: Any, name: str, *, none_ok: bool = True) -> bool | None:
    """A true boolean (``True``/``False``, numpy bools; ``None`` when allowed).

    Strings are refused: ``grad_ckpt="false"`` would otherwise be truthy.
    """
    if value is None and none_ok:
        return None
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return bool(value)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, bool):
        return value
    raise InputError(f"{name} must be True or False, got {_show(value)}",
                     "pass a bool (a string such as 'false' would read as true)")


def choice(value: Any, name: str, choices: Iterable[str], *, none_ok: bool = False, hint: str | None = None) -> str | None:
    """``value`` as one of ``choices`` (case-insensitive); the error lists the valid values."""
    if value is None and none_ok:
        return None
    choices = list(choices)
    if not isinstance(value, str):
        raise InputError(f"{name} must be one of {', '.join(choices)}, got {_show(value)}")
    key = value.strip().lower()
    for c in choices:
        if c.lower() == key:
            return c
    from .errors import did_you_mean

    near = did_you_mean(value, choices)
    raise InputError(f"unknown {name} {_show(value)}",
                     (hint + "; " if hint else "") + (f"{near} " if near else "") + f"valid: {', '.join(choices)}")


def name_text(value: Any, what: str, *, none_ok: bool = False, max_len: int = 4096) -> str | None:
    """A non-empty name string (model, GPU, method...): no NUL, at most ``max_len`` characters."""
    if value is None and none_ok:
        return None
    if not isinstance(value, str):
        raise InputError(f"{what} must be a name (a string), got {_show(value)}")
    if not value.strip() or "\x00" in value or len(value) > max_len:
        raise InputError(f"{what} {_show(value)} is not a usable name")
    return value


def scale(*, gpus: Any = 1, epochs: Any = 1.0, global_batch: Any = None, strategy: Any = None,
          offload: Any = None) -> None:
    """The scale options of estimate/fit: GPUs, epochs, global batch, strategy/offload names."""
    integer(gpus, "gpus")
    real(epochs, "epochs", lo=0.0, lo_open=True)
    integer(global_batch, "global-batch", none_ok=True)
    name_text(strategy, "--strategy", none_ok=True)
    name_text(offload, "--offload", none_ok=True)


class ContextWarning(UserWarning):
    """A sequence longer than the model's context (``max_position_embeddings``)."""


def context_note(spec, seq: int) -> str | None:
    """Warn (:class:`ContextWarning`) and return a note when ``seq`` exceeds the model's context length."""
    ctx = getattr(spec, "max_position_embeddings", None)
    if not ctx or seq <= ctx:
        return None
    import warnings

    note = (f"--seq {seq:,} is beyond {spec.name}'s context of {ctx:,} tokens (max_position_embeddings): "
            "the model was not trained that long; planned anyway (RoPE scaling would be needed)")
    warnings.warn(note, ContextWarning, stacklevel=3)
    return note


def _is_int(v: Any) -> bool:
    if isinstance(v, int):
        return True
    try:
        import numpy as np

        return isinstance(v, np.integer)
    except ImportError:  # pragma: no cover
        return False


def _is_float(v: Any) -> bool:
    if isinstance(v, float):
        return True
    try:
        import numpy as np

        return isinstance(v, np.floating)
    except ImportError:  # pragma: no cover
        return False


def _num(v) -> str:
    if v is None:
        return "?"
    if isinstance(v, int) and abs(v) >= 10**15:
        return f"{float(v):.3g}" if abs(v) < 10**300 else f"a {len(str(abs(v)))}-digit number"
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def _range_hint(lo, hi) -> str | None:
    return f"use a whole number in {lo}..{_num(hi)}" if hi is not None else None


def _show(v: Any, limit: int = 60) -> str:
    """A short, single-line repr of a user value (huge ints and strings are cut)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**15:
        return _num(v)
    try:
        text = repr(v)
    except Exception:  # a hostile __repr__
        text = f"<{type(v).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- argparse ``type=`` functions ------------------------------------------------------------

def _typed(fn: Callable[[str], Any], label: str) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            return fn(text)
        except VramplanError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = label  # argparse names the type in "invalid <name> value" messages
    return parse


_TOKEN_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_int(text: str, name: str, *, lo: int = 1, hi: int | None = None, suffixes: bool = False) -> int:
    """Read a whole number from text; with ``suffixes``, ``4k`` = 4096 and ``1m`` = 1048576 (context lengths)."""
    t = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = 1
    if suffixes and t[-1:] in ("k", "m"):
        t, mult = t[:-1], _TOKEN_SUFFIX[t[-1]]
    try:
        if len(t) > 40:
            raise ValueError
        if "." in t or "e" in t:
            f = float(t) * mult
            if not math.isfinite(f) or f != int(f):
                raise ValueError
            v = int(f)
        else:
            v = int(t) * mult
    except (ValueError, OverflowError):
        example = " (4k = 4096)" if suffixes else ""
        raise InputError(f"{_flag_name(name)} must be a whole number{example}, got {_show(text)}",
                         _range_hint(lo, LIMITS.get(name) if hi is None else hi)) from None
    return integer(v, name, lo=lo, hi=hi)


def arg_int(name: str, *, lo: int = 1, hi: int | None = None, suffixes: bool = False) -> Callable[[str], int]:
    """An argparse ``type=`` for a bounded integer flag (``--batch``, ``--seq 4k`` with ``suffixes``)."""
    return _typed(lambda t: parse_int(t, name, lo=lo, hi=hi, suffixes=suffixes), "int")


def parse_real(text: str, name: str, **bounds) -> float:
    try:
        v = float(str(text).strip()) if len(str(text)) <= 64 else float("nan")
    except ValueError:
        raise InputError(f"{_flag_name(name)} must be a number, got {_show(text)}") from None
    return real(v, name, **bounds)


def arg_real(name: str, **bounds) -> Callable[[str], float]:
    """An argparse ``type=`` for a finite, bounded float flag (``--dropout``, ``--epochs``)."""
    return _typed(lambda t: parse_real(t, name, **bounds), "float")


def arg_size(name: str) -> Callable[[str], int]:
    """An argparse ``type=`` for a capacity (``--gpu-mem 24``, ``24GiB``, ``80GB``): bytes as an int."""
    from .units import parse_size

    def parse(t: str) -> int:
        return parse_size(t, label=_flag_name(name))

    return _typed(parse, "size")


def arg_text(name: str) -> Callable[[str], str]:
    """An argparse ``type=`` for names and lists: refuses empty text, NULs and absurd lengths."""
    return _typed(lambda t: _arg_name(t, name), "str")


def _arg_name(t: str, flag_name: str) -> str:
    return name_text(t, _flag_name(flag_name))


# -- files -----------------------------------------------------------------------------------

def read_text(path: str | Path, what: str = "file", *, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """Read a user text file, bounded: a regular file, at most ``max_bytes``, UTF-8 (a BOM is dropped).

    FIFOs, devices (``/dev/zero``), sockets and directories are refused without blocking
    (the file is opened ``O_NONBLOCK`` and checked with ``fstat``); a NUL byte or invalid
    UTF-8 means "not a text file".

    Raises:
        FileError: missing, unreadable, not a regular file, too large, binary or not UTF-8.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise FileError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    except ValueError:  # embedded NUL in the path
        raise FileError(f"cannot read {what} {_show(str(path))}: not a valid path") from None
    if stat.S_ISDIR(st.st_mode):
        raise FileError(f"{what} {p} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{what} {p} is not a regular file", "pass a plain text file (not a pipe or device)")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise FileError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)  # the file opened may not be the one stat()ed
        if not stat.S_ISREG(st.st_mode):
            raise FileError(f"{what} {p} is not a regular file", "pass a plain text file (not a pipe or device)")
        if st.st_size > max_bytes:
            raise FileError(f"{what} {p} is too large ({st.st_size:,} bytes; the limit is {max_bytes:,})",
                            "is it the right file?")
        chunks, total = [], 0
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            total += len(b)
            if total > max_bytes:
                raise FileError(f"{what} {p} is too large (over {max_bytes:,} bytes)", "is it the right file?")
            chunks.append(b)
    except OSError as exc:
        raise FileError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise FileError(f"{what} {p} is UTF-16 text, not UTF-8", "save it as UTF-8")
    if b"\x00" in raw:
        raise FileError(f"{what} {p} is a binary file, not a text {what}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileError(f"{what} {p} is not UTF-8 text (byte {exc.start})", "save it as UTF-8") from None


def _reject_constant(token: str):
    raise ValueError(f"{token} is not valid JSON (not a finite number)")


def loads_json(text: str, label: str) -> Any:
    """``json.loads`` bounded: NaN/Infinity refused, nesting deeper than :data:`MAX_DEPTH` refused."""
    import json

    _check_depth_text(text, label)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise FileError(f"malformed {label}: nested too deeply") from None
    except ValueError as exc:
        raise FileError(f"malformed {label}: {_first_line(exc)}") from None


def _check_depth_text(text: str, label: str) -> None:
    """Cheap bracket-depth scan (ignores brackets in strings approximately by skipping quoted runs)."""
    depth = deepest = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    raise FileError(f"malformed {label}: nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _first_line(exc: BaseException) -> str:
    s = str(exc)
    return " ".join(s.splitlines()[0].split()) if s.strip() else exc.__class__.__name__


def loads_yaml(text: str, label: str) -> Any:
    """``yaml.safe_load`` bounded: the document, aliases expanded, may hold at most :data:`MAX_YAML_NODES`
    nodes and :data:`MAX_DEPTH` levels (a "billion laughs" alias bomb is refused before it is built).

    Raises:
        FileError: malformed YAML, too large after expansion, or nested too deeply.
        MissingDependencyError: PyYAML is not installed.
    """
    try:
        import yaml
    except ImportError:
        from .errors import MissingDependencyError

        raise MissingDependencyError(f"{label} is YAML but PyYAML is not installed",
                                     "pip install pyyaml (a vramplan dependency since 0.1)") from None
    _check_depth_text(text, label)  # deep flow nesting ([[[[...) is refused before PyYAML's parser walks it
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise FileError(f"malformed {label}: nested too deeply") from None
        except yaml.YAMLError as exc:
            raise FileError(f"malformed {label}: {_first_line(exc)}") from None
        if node is None:
            return None
        _bound_yaml(node, label)
        try:
            return loader.construct_document(node)
        except RecursionError:
            raise FileError(f"malformed {label}: nested too deeply") from None
        except yaml.YAMLError as exc:
            raise FileError(f"malformed {label}: {_first_line(exc)}") from None
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. an unhashable mapping key
            raise FileError(f"malformed {label}: {_first_line(exc)}") from None
    finally:
        loader.dispose()


def _bound_yaml(root, label: str) -> None:
    """Expanded node count and depth of a composed YAML graph (shared alias nodes counted each time)."""
    sizes: dict[int, int] = {}
    depth: dict[int, int] = {}
    # iterative post-order over the DAG (a recursive alias is a cycle: refused)
    stack: list[tuple[Any, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        nid = id(node)
        if done:
            on_path.discard(nid)
            kids = _yaml_children(node)
            sizes[nid] = 1 + sum(sizes[id(k)] for k in kids)
            depth[nid] = 1 + max((depth[id(k)] for k in kids), default=0)
            if sizes[nid] > MAX_YAML_NODES:
                raise FileError(f"{label} expands to more than {MAX_YAML_NODES:,} YAML nodes (aliases)",
                                "is it an alias bomb? write the values out")
            if depth[nid] > MAX_DEPTH:
                raise FileError(f"malformed {label}: nested deeper than {MAX_DEPTH} levels")
            continue
        if nid in sizes:
            continue
        if nid in on_path:
            raise FileError(f"malformed {label}: a recursive YAML alias")
        on_path.add(nid)
        stack.append((node, True))
        for k in _yaml_children(node):
            if id(k) not in sizes:
                stack.append((k, False))


def _yaml_children(node) -> list:
    value = getattr(node, "value", None)
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, tuple):
                out.extend(item)
            else:
                out.append(item)
        return out
    return []


def loads_toml(text: str, label: str) -> Any:
    """``tomllib.loads`` with one-line errors (deep nesting refused)."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    _check_depth_text(text, label)
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise FileError(f"malformed {label}: nested too deeply") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise FileError(f"malformed {label}: {_first_line(exc)}") from None


# -- regexes ---------------------------------------------------------------------------------

def target_regex(pattern: str, label: str = "target_modules"):
    """Compile a PEFT ``target_modules`` regex after a complexity check, so matching cannot blow up.

    PEFT matches a string ``target_modules`` with ``re.fullmatch(pattern, module_name)``. Python's
    ``re`` backtracks and cannot be interrupted, so instead of a time limit the pattern's shape is
    bounded: at most :data:`MAX_REGEX_LEN` characters, no backreferences, no repetition nested
    inside a repetition or applied to an alternation (the shapes with exponential backtracking,
    ``(a+)+``, ``(a|a)*``), and at most :data:`MAX_REGEX_UNBOUNDED` unbounded repeats (``.*``),
    which keeps a match over a module path (< 100 characters) polynomial and small.

    Raises:
        InputError: an invalid or too complex pattern.
    """
    import re

    if not isinstance(pattern, str):
        raise InputError(f"{label} must be a string or a list of names, got {_show(pattern)}")
    if len(pattern) > MAX_REGEX_LEN:
        raise InputError(f"{label} regex is too long ({len(pattern)} characters; the limit is {MAX_REGEX_LEN})",
                         "list the module names instead")
    try:
        parsed = _sre_parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise InputError(f"{label} {_show(pattern)} is not a valid regex ({_first_line(exc)})") from None
    counts = {"unbounded": 0}
    _regex_check(parsed, False, counts, pattern, label)
    if counts["unbounded"] > MAX_REGEX_UNBOUNDED:
        raise InputError(f"{label} regex {_show(pattern)} has {counts['unbounded']} unbounded repeats "
                         f"(the limit is {MAX_REGEX_UNBOUNDED})", "list the module names instead")
    return re.compile(pattern)


def _sre_parse(pattern: str):
    try:
        from re import _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore
    return sre_parse.parse(pattern)


def _has_branch(seq, c) -> bool:
    for op, av in seq:
        if op == c.BRANCH:
            return True
        if op == c.SUBPATTERN and _has_branch(av[-1], c):
            return True
        if op in (c.MAX_REPEAT, c.MIN_REPEAT) and _has_branch(av[2], c):
            return True
    return False


def _regex_check(seq, inside_repeat: bool, counts: dict, pattern: str, label: str) -> None:
    try:
        from re import _constants as c  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_constants as c  # type: ignore
    too_complex = InputError(f"{label} regex {_show(pattern)} is too complex to match safely "
                             "(a repeat inside a repeat, a repeated alternation or a backreference)",
                             "list the module names, or use a simpler pattern such as .*(q_proj|v_proj)")
    for op, av in seq:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            multi = hi is c.MAXREPEAT or hi > 1
            if inside_repeat and (multi or lo != hi):  # (a+)+, (a?){30}: exponentially many ways to split
                raise too_complex
            if hi is c.MAXREPEAT:
                counts["unbounded"] += 1
            if multi and _has_branch(sub, c):  # (a|aa)+, (a|b|ab)*: an ambiguous alternation repeated
                raise too_complex
            _regex_check(sub, inside_repeat or multi, counts, pattern, label)
        elif op == c.SUBPATTERN:
            _regex_check(av[-1], inside_repeat, counts, pattern, label)
        elif op == c.BRANCH:
            for alt in av[1]:
                _regex_check(alt, inside_repeat, counts, pattern, label)
        elif op in (c.GROUPREF, getattr(c, "GROUPREF_EXISTS", None)):
            raise too_complex
        elif op in (c.ASSERT, c.ASSERT_NOT):
            _regex_check(av[1], inside_repeat, counts, pattern, label)
        elif op == getattr(c, "ATOMIC_GROUP", None):
            _regex_check(av, inside_repeat, counts, pattern, label)


# -- output paths and atomic writes ----------------------------------------------------------

def file_stem(value: Any, flag_name: str = "--name") -> str:
    """A file name stem that stays inside its output directory: no separators, no ``..``, no NUL."""
    text = name_text(value, flag_name)
    if "/" in text or "\\" in text or text in (".", "..") or text.startswith(".") or len(text) > 200:
        raise InputError(f"{flag_name} {_show(text)} must be a plain file name (no directories, no leading dot)",
                         "use --out DIR to choose the directory")
    return text


def atomic_write(path: str | Path, data: str | bytes, *, what: str = "file") -> Path:
    """Write ``data`` to ``path`` atomically: a temporary file beside it, fsync, ``os.replace``.

    On any failure (disk full, read-only directory, permission) the temporary file is removed,
    the previous file is left intact, and a :class:`~vramplan.errors.WriteError` names the path
    and the cause.
    """
    p = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    fd = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view = memoryview(raw)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, p)
    except OSError as exc:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise WriteError(f"cannot write {what} {p}: {exc.strerror or exc}",
                         _write_hint(exc)) from None
    return p


def write_error(exc: OSError, path: str | Path, what: str = "file") -> WriteError:
    """The one-line error of a failed write (for writers that cannot use :func:`atomic_write`)."""
    return WriteError(f"cannot write {what} {path}: {exc.strerror or exc}", _write_hint(exc))


def _write_hint(exc: OSError) -> str | None:
    import errno

    return {errno.ENOSPC: "free some disk space and run it again",
            errno.EROFS: "the file system is read-only; choose another directory",
            errno.EACCES: "you lack permission there; choose another directory",
            errno.EPERM: "you lack permission there; choose another directory",
            errno.EDQUOT: "disk quota exceeded; free some space"}.get(exc.errno)
