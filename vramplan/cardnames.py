"""Card names: how a GPU's name is normalised and which catalogue card (``vramplan/data/gpus.json``) it names.

Below both :mod:`vramplan.gpus` (which resolves names to :class:`~vramplan.gpus.GPUSpec`) and
:mod:`vramplan.profiles` (which checks that a calibration profile was measured on the card it is
for), so that neither imports the other to compare names. Reads the catalogue's raw entries;
:func:`vramplan.gpus.catalogue` validates them.
"""

from __future__ import annotations

import re
from functools import lru_cache

from ._data import load_data


def norm_name(text: str) -> str:
    """``"NVIDIA GeForce RTX 4090"`` -> ``"rtx4090"``: lower case, vendor words and punctuation dropped."""
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("nvidia", "").replace("geforce", ""))


@lru_cache(maxsize=None)
def alias_table() -> dict[str, str]:
    """Normalised name, display name, alias or NVML name -> catalogue name (the first entry wins)."""
    table: dict[str, str] = {}
    for entry in load_data("gpus.json")["gpus"]:
        for key in (entry["name"], entry["display_name"], *entry.get("aliases", ()), *entry.get("nvml_names", ())):
            table.setdefault(norm_name(key), entry["name"])
    return table


def catalogue_name(name: str) -> str | None:
    """The catalogue name of ``name`` (a name, alias or NVML name), or None for a card outside the catalogue."""
    return alias_table().get(norm_name(str(name)))
