"""Card prices (``vramplan/data/prices.json``): launch list price and typical on-demand $/GPU-hour, each sourced.

Used by :func:`vramplan.plan.fit_cards` to rank the cards that fit by cost to train. Prices are
data with a source and the date they describe; nothing here is computed from them but products
(hours x $/hour). Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError


@dataclass(frozen=True)
class Price:
    """One card's prices in USD; None where no source gives one."""

    gpu: str
    list_usd: float | None = None
    list_source: str | None = None        # a key of prices.json "sources"
    cloud_usd_per_hour: float | None = None
    cloud_source: str | None = None

    def source_text(self, which: str) -> str | None:
        key = self.list_source if which == "list" else self.cloud_source
        if key is None:
            return None
        s = sources()[key]
        return f"{s['title']} ({s['date']}, {s['url']})"

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "list_usd": self.list_usd, "list_source": self.list_source,
                "cloud_usd_per_hour": self.cloud_usd_per_hour, "cloud_source": self.cloud_source}


@lru_cache(maxsize=1)
def sources() -> dict[str, dict]:
    return dict(load_data("prices.json")["sources"])


@lru_cache(maxsize=1)
def prices() -> dict[str, Price]:
    """Every priced card by catalogue name; validated on load (known card, positive figures, known source)."""
    from .gpus import catalogue

    raw = load_data("prices.json")
    cards = catalogue()
    out: dict[str, Price] = {}
    for e in raw["prices"]:
        p = Price(gpu=e["gpu"], list_usd=e.get("list_usd"), list_source=e.get("list_source"),
                  cloud_usd_per_hour=e.get("cloud_usd_per_hour"), cloud_source=e.get("cloud_source"))
        if p.gpu not in cards:
            raise VramplanError(f"prices.json: unknown card {p.gpu!r}")
        for value, src in ((p.list_usd, p.list_source), (p.cloud_usd_per_hour, p.cloud_source)):
            if value is not None and (not value > 0 or src not in raw["sources"]):
                raise VramplanError(f"prices.json: {p.gpu}: a price needs a positive value and a known source")
        out[p.gpu] = p
    return out


def price_of(gpu: str) -> Price:
    """The prices of catalogue card ``gpu`` (an empty Price when none is known)."""
    return prices().get(gpu.split("@", 1)[0], Price(gpu=gpu))
