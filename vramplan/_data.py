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


def read_config_file(path: Path) -> dict:
    """Read a user JSON/TOML/YAML file into a dict, with a one-line error when it is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise VramplanError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix in (".toml",):
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml  # optional; only for Axolotl/TRL YAML files
            except ImportError:
                raise VramplanError(f"{path} is YAML but PyYAML is not installed", "pip install pyyaml") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except VramplanError:
        raise
    except Exception as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise VramplanError(f"malformed {path.name}: {first}") from None
    if not isinstance(data, dict):
        raise VramplanError(f"malformed {path.name}: expected a mapping at the top level")
    return data
