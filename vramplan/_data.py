"""Loading the packaged data files (catalogues) with one clear error when they are broken."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import VramplanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATA_DIR = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=None)
def load_data(name: str) -> Any:
    """Parse ``vramplan/data/<name>`` (JSON or TOML). Cached: catalogues are read once."""
    path = DATA_DIR / name
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise VramplanError(f"cannot read packaged catalogue {path}: {exc}", "reinstall vramplan") from None


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
