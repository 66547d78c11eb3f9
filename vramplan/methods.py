"""The method registry: which model copies live in memory, what trains, in which precision.

Definitions are data (``vramplan/data/methods.toml``), validated on load; this module
resolves a method plus an adapter choice into the concrete model copies that the
analytic model, the dry run and the calibration runner all build from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError, unknown


class Adapter(str, Enum):
    """What trains in a copy that trains."""

    FULL = "full"    # every base weight
    LORA = "lora"    # LoRA over a 16-bit frozen base
    QLORA = "qlora"  # LoRA over an NF4 frozen base
    DORA = "dora"    # DoRA over a 16-bit frozen base
    IA3 = "ia3"      # IA³ vectors over a 16-bit frozen base

    @property
    def is_peft(self) -> bool:
        return self is not Adapter.FULL

    @property
    def quantized_base(self) -> bool:
        return self is Adapter.QLORA


class Role(str, Enum):
    POLICY = "policy"
    REFERENCE = "reference"
    REWARD = "reward"
    VALUE = "value"


class Forward(str, Enum):
    GRAD = "grad"
    NO_GRAD = "no_grad"
    NONE = "none"


@dataclass(frozen=True)
class CopyDef:
    """One model copy as the registry declares it."""

    role: Role
    trains: bool
    shares_base: bool
    head: str  # "lm" or "scalar"
    forward: Forward


LOSSES = ("causal_lm", "sequence_logps", "response_logps")


@dataclass(frozen=True)
class MethodDef:
    """A method as declared in methods.toml."""

    name: str
    summary: str
    source: str
    adapters: tuple[Adapter, ...]
    sequences_per_example: int
    rollout: bool
    copies: tuple[CopyDef, ...]
    #: how the policy's logits become the loss: "causal_lm" (the model's cross-entropy),
    #: "sequence_logps" (per-token log-probs of the labels, summed per sequence: TRL DPO) or
    #: "response_logps" (log-probs of the generated response tokens only: TRL PPO)
    loss: str = "causal_lm"

    @property
    def default_adapter(self) -> Adapter:
        return self.adapters[0]


@dataclass(frozen=True)
class ModelCopy:
    """A copy that is really held in memory, with its concrete adapter.

    ``adapter`` is None for a frozen copy. ``quantized`` says whether its frozen base
    weights are NF4 (QLoRA bases, and frozen copies next to a QLoRA policy).
    """

    role: Role
    adapter: Adapter | None
    quantized: bool
    head: str
    forward: Forward

    @property
    def trains(self) -> bool:
        return self.adapter is not None


@dataclass(frozen=True)
class Recipe:
    """A method resolved with its adapter choice: the input of every layer of vramplan."""

    method: MethodDef
    adapter: Adapter
    copies: tuple[ModelCopy, ...]   # held in memory (shared bases left out)
    shared_roles: tuple[Role, ...]  # roles served by the policy's base with the adapter disabled

    @property
    def name(self) -> str:
        if self.adapter.value == self.method.name:
            return self.method.name
        return f"{self.method.name}+{self.adapter.value}"

    @property
    def sequences_per_example(self) -> int:
        return self.method.sequences_per_example


def _parse(name: str, raw: dict) -> MethodDef:
    try:
        copies = tuple(
            CopyDef(Role(c["role"]), bool(c["trains"]), bool(c.get("shares_base", False)),
                    str(c.get("head", "lm")), Forward(c.get("forward", "grad")))
            for c in raw["copies"]
        )
        md = MethodDef(
            name=name,
            summary=str(raw["summary"]),
            source=str(raw["source"]),
            adapters=tuple(Adapter(a) for a in raw["adapters"]),
            sequences_per_example=int(raw["sequences_per_example"]),
            rollout=bool(raw.get("rollout", False)),
            copies=copies,
            loss=str(raw.get("loss", "causal_lm")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise VramplanError(f"methods.toml: method {name!r} is invalid ({exc})") from None
    if md.loss not in LOSSES:
        raise VramplanError(f"methods.toml: method {name!r}: loss must be one of {', '.join(LOSSES)}, not {md.loss!r}")
    if not md.copies or md.copies[0].role is not Role.POLICY or not md.copies[0].trains:
        raise VramplanError(f"methods.toml: method {name!r} must list a training policy copy first")
    if md.sequences_per_example < 1 or any(h not in ("lm", "scalar") for h in (c.head for c in copies)):
        raise VramplanError(f"methods.toml: method {name!r} has a bad sequences_per_example or head")
    return md


@lru_cache(maxsize=None)
def registry() -> dict[str, MethodDef]:
    """All methods, in catalogue order, validated."""
    return {name: _parse(name, raw) for name, raw in load_data("methods.toml").items()}


def method_names() -> list[str]:
    return list(registry())


def get_method(name: str) -> MethodDef:
    try:
        return registry()[name.lower()]
    except KeyError:
        raise unknown("method", name, registry(), "vramplan methods") from None


def parse_recipe_name(text: str, adapter: str | None = None) -> tuple[str, str | None]:
    """``"dpo+qlora"`` -> ``("dpo", "qlora")``, ``"lora"`` -> ``("lora", adapter)``: the one parser of recipe names.

    ``vramplan matrix`` prints recipes as ``method+adapter``; ``estimate``, ``fit``, suites and the
    API accept the same text. An ``adapter`` given as well must agree with the name's.

    Raises:
        VramplanError: both name an adapter and they differ.
    """
    m, plus, a = str(text).strip().lower().partition("+")
    m, a = m.strip(), a.strip()
    if not plus or not a:
        return m, adapter
    if adapter is not None and str(getattr(adapter, "value", adapter)).lower() != a:
        raise VramplanError(f"method {text!r} names adapter {a!r} but --adapter is {adapter!r}",
                            f"pass --method {m} --adapter {adapter}, or --method {text} alone")
    return m, a


def resolve(method: str | MethodDef | Recipe, adapter: str | Adapter | None = None) -> Recipe:
    """Resolve ``method`` (+ ``adapter`` for DPO/PPO) into the copies held in memory.

    A frozen copy next to a QLoRA policy is quantised too (the same loading recipe).
    A copy with ``shares_base`` next to a PEFT policy is the policy's base with the
    adapter disabled (TRL's default), so it is not held separately.
    """
    if isinstance(method, Recipe):
        return method
    if isinstance(method, str) and "+" in method:
        method, adapter = parse_recipe_name(method, adapter)
    md = method if isinstance(method, MethodDef) else get_method(method)
    if adapter is None:
        ad = md.default_adapter
    else:
        try:
            ad = Adapter(adapter.lower() if isinstance(adapter, str) else adapter)
        except ValueError:
            raise unknown("adapter", str(adapter), [a.value for a in Adapter]) from None
        if ad not in md.adapters:
            choices = ", ".join(a.value for a in md.adapters)
            raise VramplanError(f"method {md.name!r} does not take adapter {ad.value!r}", f"choose one of {choices}")
    held, shared = [], []
    for c in md.copies:
        if c.shares_base and ad.is_peft:
            shared.append(c.role)
            continue
        held.append(ModelCopy(role=c.role, adapter=ad if c.trains else None, quantized=ad.quantized_base,
                              head=c.head, forward=c.forward))
    return Recipe(method=md, adapter=ad, copies=tuple(held), shared_roles=tuple(shared))
