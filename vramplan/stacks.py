"""Training stacks (``--framework``) and memory-saving techniques (``--techniques``), as data.

Definitions live in ``vramplan/data/stacks.toml`` with the source of every claim; this
module validates them and answers the questions the analytic model asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError, unknown

LOSSES = ("full_fp32", "chunked", "fused_linear")


@dataclass(frozen=True)
class Stack:
    name: str
    summary: str
    loss: str
    loss_chunks: int
    adapter_dtype: str
    peft_input_cast: bool
    kbit_upcast: bool
    gc_offload: bool
    frees_logits: bool
    default_precision: str
    runner: str
    techniques: tuple[str, ...]
    dryrun: str
    sources: tuple[str, ...]


@dataclass(frozen=True)
class Technique:
    """A memory-saving technique: what it does, and the step time it adds (fractions, sourced).

    ``cost`` is the fraction of step time added without gradient checkpointing and
    ``cost_with_ckpt`` with it (activation offloading moves only the layer inputs then;
    selective checkpointing changes nothing). ``saver`` is False for a setting that costs
    memory (padding): the recommender never proposes it.
    """

    name: str
    summary: str
    cost: float
    source: str
    label: str = ""
    cost_with_ckpt: float | None = None
    cost_source: str = ""
    saver: bool = True

    def cost_for(self, cfg) -> float:
        """Fraction of step time this technique adds to ``cfg`` (a :class:`~vramplan.config.TrainConfig`)."""
        if cfg.grad_ckpt and self.cost_with_ckpt is not None:
            return self.cost_with_ckpt
        return self.cost


def _raw() -> dict:
    return load_data("stacks.toml")


@lru_cache(maxsize=None)
def techniques() -> dict[str, Technique]:
    out = {}
    for name, t in _raw().get("techniques", {}).items():
        try:
            ckpt = t.get("cost_with_ckpt")
            out[name] = Technique(name, str(t["summary"]), float(t["cost"]), str(t["source"]),
                                  label=str(t.get("label", name)),
                                  cost_with_ckpt=None if ckpt is None else float(ckpt),
                                  cost_source=str(t.get("cost_source", "")), saver=bool(t.get("saver", True)))
        except (KeyError, ValueError, TypeError) as exc:
            raise VramplanError(f"stacks.toml: technique {name!r} is invalid ({exc})") from None
        if not 0.0 <= out[name].cost < 10.0 or not 0.0 <= (out[name].cost_with_ckpt or 0.0) < 10.0:
            raise VramplanError(f"stacks.toml: technique {name!r} has a cost outside [0, 10)")
    return out


@lru_cache(maxsize=None)
def stacks() -> dict[str, Stack]:
    out = {}
    for name, s in _raw().items():
        if name == "techniques":
            continue
        try:
            st = Stack(name=name, summary=str(s["summary"]), loss=str(s["loss"]), loss_chunks=int(s["loss_chunks"]),
                       adapter_dtype=str(s["adapter_dtype"]), peft_input_cast=bool(s["peft_input_cast"]),
                       kbit_upcast=bool(s["kbit_upcast"]), gc_offload=bool(s["gc_offload"]),
                       frees_logits=bool(s["frees_logits"]), default_precision=str(s["default_precision"]),
                       runner=str(s["runner"]), techniques=tuple(s.get("techniques", ())), dryrun=str(s["dryrun"]),
                       sources=tuple(s["sources"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise VramplanError(f"stacks.toml: stack {name!r} is invalid ({exc})") from None
        if st.loss not in LOSSES or st.loss_chunks < 1 or st.runner not in ("trainer", "loop", "regime"):
            raise VramplanError(f"stacks.toml: stack {name!r} has a bad loss, loss_chunks or runner")
        bad = [t for t in st.techniques if t not in techniques()]
        if bad:
            raise VramplanError(f"stacks.toml: stack {name!r} names unknown technique {bad[0]!r}")
        out[name] = st
    return out


def get_stack(name: str) -> Stack:
    try:
        return stacks()[name.lower()]
    except KeyError:
        raise unknown("framework", name, stacks()) from None


def parse_techniques(value) -> tuple[str, ...]:
    """``"chunked_ce,act_offload"`` or a sequence -> validated, de-duplicated names."""
    if not value:
        return ()
    items = [t.strip() for t in value.split(",")] if isinstance(value, str) else [str(t) for t in value]
    out: list[str] = []
    for t in items:
        t = t.replace("-", "_")
        if not t:
            continue
        if t not in techniques():
            raise unknown("technique", t, techniques())
        if t not in out:
            out.append(t)
    if "chunked_ce" in out and "liger_ce" in out:
        raise VramplanError("chunked_ce and liger_ce are two ways to compute the same loss", "choose one")
    return tuple(out)


def effective_regime(precision: str, framework: str):
    """The precision regime as ``framework`` runs it: adapter dtype and optimizer kernel per the stack."""
    from dataclasses import replace

    from .precision import get_regime

    regime = get_regime(precision)
    st = get_stack(framework)
    adapter = regime.compute_dtype if st.adapter_dtype == "regime" else st.adapter_dtype
    runner = regime.runner if st.runner == "regime" else st.runner
    return replace(regime, adapter_dtype=adapter, runner=runner)
