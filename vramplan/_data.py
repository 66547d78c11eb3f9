"""Loading the packaged data files (catalogues) with one clear error when they are broken."""

from __future__ import annotations

import json
import marshal
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import VramplanError

DATA_DIR = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=None)
def load_data(name: str) -> Any:
    """Parse ``vramplan/data/<name>`` (JSON or TOML). Cached: catalogues are read once.

    The TOML file stays the only source: it is read on every call, and its parse is reused from
    :func:`parsed_toml`'s cache only when that cache holds this very text.
    """
    path = DATA_DIR / name
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            return parsed_toml(path, text)
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise VramplanError(f"cannot read packaged catalogue {path}: {exc}", "reinstall vramplan") from None


def toml_cache_path(path: Path) -> Path | None:
    """Where :func:`parsed_toml` keeps ``path``'s parse: beside the bytecode, as Python keeps a module's.

    ``<dir>/__pycache__/<name>.<cache tag>.marshal``, or under ``sys.pycache_prefix``
    (``PYTHONPYCACHEPREFIX``) when one is set; None where the interpreter has no cache tag.
    """
    return beside_bytecode(path.parent, f"{path.name}.{{tag}}.marshal")


def beside_bytecode(directory: Path, name: str) -> Path | None:
    """The path of a cache file ``name`` for the sources in ``directory``, where Python keeps their bytecode.

    ``<directory>/__pycache__/<name>``, or under ``sys.pycache_prefix`` (``PYTHONPYCACHEPREFIX``) when one
    is set; ``{tag}`` in ``name`` becomes the interpreter's cache tag (``cpython-311``: a cache of another
    interpreter is another file). None where the interpreter has no cache tag.
    """
    tag = sys.implementation.cache_tag
    if tag is None:
        return None
    name = name.replace("{tag}", tag)
    if sys.pycache_prefix:
        return Path(sys.pycache_prefix, *directory.resolve().parts[1:], name)
    return directory / "__pycache__" / name


def parsed_toml(path: Path, text: str) -> Any:
    """``tomllib.loads(text)``, reused from a marshal file that holds ``text`` itself beside its parse.

    tomllib parses in pure Python (stacks.toml: ~8 ms a process); a ``marshal`` load of the same
    tables is ~0.1 ms. The cache stores the whole source text with the parse and is used only when
    that text equals ``text`` character for character, so an edited catalogue is parsed afresh on
    the next run, with no other step and no hash to collide. The file is written atomically (a
    temporary file, then ``os.replace``); one that is missing, unreadable, of another format or
    stale is ignored and rewritten, and where it cannot be written the parse is simply not kept.
    As with bytecode, nothing is written where ``sys.dont_write_bytecode`` (``PYTHONDONTWRITEBYTECODE``,
    ``-B``) is set; a cache already there is still read. Raises what ``tomllib.loads`` raises.
    """
    cache = toml_cache_path(path)
    if cache is not None:
        try:
            cached_text, data = marshal.loads(cache.read_bytes())
            if cached_text == text:
                return data
        except Exception:  # noqa: BLE001 - missing, unreadable or foreign: parse the TOML instead
            pass
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    data = tomllib.loads(text)
    if cache is not None and not sys.dont_write_bytecode:
        write_marshal_atomically(cache, (text, data))
    return data


def write_marshal_atomically(cache: Path, value: Any) -> None:
    """Write ``marshal.dumps(value)`` to ``cache``: a temporary file, then ``os.replace``. Nothing is written,
    and nothing raised, where the value cannot be marshalled or the directory cannot be written."""
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        blob = marshal.dumps(value)  # ValueError: a value marshal cannot hold (a TOML date): not kept
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        os.replace(tmp, cache)
    except (OSError, ValueError):  # read-only install, full disk...: the parse is just not kept
        try:
            tmp.unlink()
        except OSError:
            pass


def read_config_file(path: Path, what: str = "config") -> dict:
    """Read a user JSON/TOML/YAML file into a dict, with a one-line error when it is malformed.

    Bounded (:mod:`vramplan.validate`): only a regular file of at most 8 MiB of UTF-8 text is
    read; JSON NaN/Infinity, nesting deeper than 100 levels and YAML alias bombs are refused.
    """
    from .validate import loads_json, loads_toml, loads_yaml, read_text

    path = Path(path)
    text = read_text(path, what)
    if path.suffix in (".toml",):
        data = loads_toml(text, path.name)
    elif path.suffix in (".yaml", ".yml"):
        data = loads_yaml(text, path.name)
    else:
        data = loads_json(text, path.name)
    if not isinstance(data, dict):
        raise VramplanError(f"malformed {path.name}: expected a mapping at the top level")
    return data
