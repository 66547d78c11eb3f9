"""Plausible adapter configurations for a run whose source leaves its LoRA configuration unknown.

A published row that does not state its LoRA rank or target modules (``RunConfig.unstated``) is not
one configuration but a range of them. Planning it at one guess (PEFT's defaults) and calling the
outcome from that point would be a choice the source never made, and guessing the configuration
that matches the outcome would be a fudge factor. :mod:`vramplan.measurements.accuracy` plans such a
row once per configuration of ``vramplan/data/adapter_configs.toml`` (each written out by a
published recipe or library default, with its source) and judges its OOM / fit-only outcome on the
envelope (:func:`envelope_verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .._data import load_data
from ..errors import VramplanError

#: the configuration fields a source may leave unknown, and the member values that replace them
UNSTATED_FIELDS = ("rank", "targets")
DATA = "adapter_configs.toml"


@dataclass(frozen=True)
class AdapterConfig:
    """One plausible LoRA configuration (``adapter_configs.toml``)."""

    name: str
    rank: int
    targets: tuple[str, ...] | None  # None: the model type's default (PEFT's mapping)
    dropout: float
    source: str
    central: bool = False

    def settings(self, unstated, dropout_stated: bool) -> dict:
        """The planner keywords this configuration sets for a run that leaves ``unstated`` unknown (and states
        its dropout or not): rank, targets (absent: the model's default) and dropout (absent: none)."""
        kw: dict = {}
        if "rank" in unstated:
            kw["rank"] = self.rank
        if "targets" in unstated and self.targets is not None:
            kw["targets"] = list(self.targets)
        if not dropout_stated and self.dropout:
            kw["dropout"] = self.dropout
        return kw


def _parse(name: str, raw: dict) -> AdapterConfig:
    where = f"{DATA}: [{name}]"
    known = {"rank", "targets", "dropout", "central", "source"}
    bad = sorted(set(raw) - known)
    if bad:
        raise VramplanError(f"{where} has unknown field {bad[0]!r}", f"fields: {', '.join(sorted(known))}")
    rank = raw.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise VramplanError(f"{where}: rank must be a positive integer, got {rank!r}")
    t = raw.get("targets", "default")
    if t == "default":
        targets = None
    elif t == "all-linear":
        targets = ("all-linear",)
    elif isinstance(t, list) and t and all(isinstance(x, str) and x for x in t):
        targets = tuple(t)
    else:
        raise VramplanError(f"{where}: targets must be \"default\", \"all-linear\" or a list of module roles, got {t!r}")
    d = raw.get("dropout", 0.0)
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= float(d) < 1.0:
        raise VramplanError(f"{where}: dropout must be a number in [0, 1), got {d!r}")
    src = raw.get("source")
    if not isinstance(src, str) or not src.strip():
        raise VramplanError(f"{where}: every configuration names its source")
    central = raw.get("central", False)
    if not isinstance(central, bool):
        raise VramplanError(f"{where}: central must be true or false")
    return AdapterConfig(name, rank, targets, float(d), src.strip(), central)


def parse_configs(raw: dict) -> tuple[AdapterConfig, ...]:
    """Validate an ``adapter_configs.toml``-shaped mapping (name -> table); exactly one is ``central``."""
    if not isinstance(raw, dict) or not raw:
        raise VramplanError(f"{DATA}: no configuration")
    out = tuple(_parse(str(k), v if isinstance(v, dict) else {}) for k, v in raw.items())
    if sum(c.central for c in out) != 1:
        raise VramplanError(f"{DATA}: exactly one configuration must be central, got "
                            f"{sum(c.central for c in out)}")
    return out


@lru_cache(maxsize=None)
def plausible_configs() -> tuple[AdapterConfig, ...]:
    """The packaged plausible configurations, validated (central first)."""
    out = parse_configs(load_data(DATA))
    return tuple(sorted(out, key=lambda c: not c.central))


def central_config() -> AdapterConfig:
    return plausible_configs()[0]


def envelope_verdict(verdicts) -> str | None:
    """The verdict on a range of plausible configurations from each one's verdict (comfortable | tight | no):
    "comfortable" only if every one is comfortable, "no" only if every one is "no", else "tight"."""
    vs = [v for v in verdicts if v is not None]
    if not vs:
        return None
    if all(v == "comfortable" for v in vs):
        return "comfortable"
    if all(v == "no" for v in vs):
        return "no"
    return "tight"
