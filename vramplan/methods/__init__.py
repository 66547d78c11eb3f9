"""The method registry: which model copies live in memory, what trains, how the method behaves.

A method is **one data entry plus one behaviour module**. Definitions are data
(``vramplan/data/methods.toml``), validated on load; this package resolves a method plus an
adapter choice into the concrete model copies that the analytic model, the dry run and the
calibration runner all build from, and reaches the method's behaviour through
``recipe.behaviour`` (the module named by the entry's ``behaviour`` field: ``sft``, ``dpo``,
``ppo`` in this package, or a dotted module path). No layer compares a method's name.

The behaviour contract (:class:`vramplan.methods.base.Behaviour`; SFT's defaults, a method
overrides only what differs; ``cfg`` is a TrainConfig):

* ``options`` -- tuple of :class:`~vramplan.methods.base.Option`: the method's own knobs as data
  (name, kind, bounds, default, CLI flag, help, ``shape``, trainer-config keys). The CLI adds
  each flag to estimate/fit/dryrun (:func:`all_options`); ``make_config(method_options={...})``
  (and ``estimate``/``fit``/``dryrun``'s ``method_options=``) validate them through
  ``resolve_options``; the config carries them (``cfg.option(name)``).
* ``resolve_options(values, seq) -> dict`` -- each option validated, defaults filled.
* ``reset_shape() -> dict`` -- ``cfg.with_(**changes)`` that lets a search vary ``seq`` (the
  ``shape`` options back to None, so each length takes its default).
* ``generates`` (bool) and ``generation(cfg, seq=None) -> Generation | None`` -- prompt tokens,
  generated tokens (per generated sequence) and sequences generated per example; memory.py
  (KV cache, rollout logits), throughput.py (prefill + decode) and activations.py read it.
  :mod:`vramplan.methods.generation` holds the shared token split.
* ``min_seq() -> int`` -- the shortest sequence (tokens) the limits and searches consider.
* ``assumptions(cfg) -> list[str]`` / ``dryrun_assumptions(cfg) -> list[str]`` -- assumption text
  for the plan (planner/checks.py) and the dry run.
* ``step`` (``"module:function"``) -- the real torch step the dry run and the calibration runner
  execute (``vramplan.runtime.steps.run_step`` imports it on use; torch is never imported here).
* ``takes_adapter_choice`` (bool) -- recipes read ``method+adapter`` (DPO, PPO).
* ``trainer_names`` / ``axolotl_rl`` / ``report_names`` / ``config_names`` -- TRL config/trainer class names,
  Axolotl ``rl:`` values, words in published reports and values of a config's ``method`` key that mean the method; ``config_keys`` /
  ``recognised_by(keys) -> tuple[str, ...]`` -- the keys that mark a trainer config file as the method's.

The model copies, sequences per example and loss buffers (``loss``) stay data in methods.toml.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property, lru_cache
from importlib import import_module
from typing import Any

from .._data import load_data
from ..errors import VramplanError, unknown
from .base import Behaviour, Generation, Option


class Adapter(str, Enum):
    """What trains in a copy that trains."""

    FULL = "full"    # every base weight
    LORA = "lora"    # LoRA over a 16-bit frozen base
    QLORA = "qlora"  # LoRA over an NF4 frozen base
    DORA = "dora"    # DoRA over a 16-bit frozen base
    IA3 = "ia3"      # IA³ vectors over a 16-bit frozen base
    QDORA = "qdora"  # DoRA over an NF4 frozen base (PEFT use_dora over bitsandbytes Linear4bit)
    QIA3 = "qia3"    # IA³ vectors over an NF4 frozen base (PEFT IA³ over bitsandbytes Linear4bit)

    # Each member's flags: plain attributes set once below the class (the planner reads them thousands of times
    # per ``fit``), worked out by _flags():
    is_peft: bool         # anything but full training
    quantized_base: bool  # an NF4 frozen base (QLoRA, QDoRA, 4-bit IA³)
    low_rank: bool        # LoRA, QLoRA, DoRA and QDoRA: rank-``r`` A/B matrices on the target linears
    dora: bool            # DoRA's magnitude vector and weight norm over the LoRA matrices (DoRA, QDoRA)
    ia3: bool             # IA³ scaling vectors (IA³, 4-bit IA³)

    @property
    def four_bit(self) -> "Adapter | None":
        """The same adapter over an NF4 base (the fallback ``fit`` offers), or None."""
        return _FOUR_BIT.get(self)

    @property
    def sixteen_bit(self) -> "Adapter | None":
        """The same adapter over a 16-bit base (QLoRA -> LoRA), or None when the base is not NF4."""
        return next((a for a, q in _FOUR_BIT.items() if q is self), None)

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def peft_type(self) -> str | None:
        """PEFT's ``PeftType`` of the adapter (``"LORA"``: LoRA, QLoRA, DoRA, QDoRA -- DoRA is LoRA with
        ``use_dora=True``; ``"IA3"``: IA³, 4-bit IA³), None for full training (peft ``utils/peft_types.py``)."""
        return "LORA" if self.low_rank else "IA3" if self.ia3 else None

    @classmethod
    def of(cls, peft_type: str | None, *, dora: bool = False, four_bit: bool = False) -> "Adapter | None":
        """The adapter a trainer's settings describe: PEFT type ``peft_type`` (``"LORA"``, ``"IA3"``; None or
        ``""``: full training), ``use_dora`` (LoRA only) and a 4-bit (NF4) base; None when none is modelled
        (another PEFT type, or full training over a 4-bit base)."""
        kind = str(peft_type or "").upper() or None
        for ad in cls:
            if ad.peft_type == kind and ad.quantized_base == bool(four_bit) and (ad.dora == bool(dora) or not ad.low_rank):
                return ad
        return None


#: the LoRA family: adapters with a rank, an alpha and target linears
LOW_RANK = (Adapter.LORA, Adapter.QLORA, Adapter.DORA, Adapter.QDORA)
#: each 16-bit-base adapter's NF4-base twin
_FOUR_BIT = {Adapter.LORA: Adapter.QLORA, Adapter.DORA: Adapter.QDORA, Adapter.IA3: Adapter.QIA3}


def _flags(ad: Adapter) -> dict[str, bool]:
    """The flags of adapter ``ad`` (see :class:`Adapter`)."""
    return {"is_peft": ad is not Adapter.FULL, "quantized_base": ad in _FOUR_BIT.values(), "low_rank": ad in LOW_RANK,
            "dora": ad in (Adapter.DORA, Adapter.QDORA), "ia3": ad in (Adapter.IA3, Adapter.QIA3)}


for _ad in Adapter:
    _ad.__dict__.update(_flags(_ad))
del _ad
_LABELS = {Adapter.FULL: "full", Adapter.LORA: "LoRA", Adapter.QLORA: "QLoRA", Adapter.DORA: "DoRA",
           Adapter.IA3: "IA³", Adapter.QDORA: "QDoRA", Adapter.QIA3: "4-bit IA³"}


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


@dataclass(frozen=True)
class LossKind:
    """How a method's training copy turns its logits into the loss (methods.toml ``loss``), by attributes.

    ``per_token_logps``: the method gathers the label tokens' log-probs itself (``log_softmax`` then
    ``gather``, TRL DPO's ``concatenated_forward`` / PPO's ``selective_log_softmax``) instead of the model's
    cross-entropy, so the stack's fused, chunked or compiled cross-entropy does not apply.
    ``response_only``: only the generated response's tokens (TRL PPO), not the whole sequence.
    """

    name: str
    summary: str
    per_token_logps: bool = False
    response_only: bool = False


#: the loss kinds a method may declare, by name (methods.toml ``loss``)
LOSS_KINDS: dict[str, LossKind] = {k.name: k for k in (
    LossKind("causal_lm", "the model's causal-LM cross-entropy (the stack's loss mode)"),
    LossKind("sequence_logps", "per-token log-probs of the labels, summed per sequence (TRL DPO)",
             per_token_logps=True),
    LossKind("response_logps", "log-probs of the generated response tokens only (TRL PPO)",
             per_token_logps=True, response_only=True),
)}
LOSSES = tuple(LOSS_KINDS)


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
    #: the behaviour module: a module of this package (``"dpo"``) or a dotted module path
    behaviour_name: str = "sft"
    #: a default row of ``fit`` and of ``matrix --methods all`` (False: reached as another method's
    #: 4-bit fallback -- QDoRA for DoRA, 4-bit IA³ for IA³ --, as a trainer config's variant -- DPO/KTO with
    #: precomputed reference log-probs --, or asked for by name)
    listed: bool = True

    @cached_property
    def behaviour(self) -> Behaviour:
        """:func:`load_behaviour` of :attr:`behaviour_name`, kept in this (frozen) method's ``__dict__`` once read:
        a ``fit`` reads it some ten thousand times; equality, hashing and ``asdict()`` see the fields only."""
        return load_behaviour(self.behaviour_name)

    @property
    def loss_kind(self) -> LossKind:
        """The :class:`LossKind` of :attr:`loss` (validated on load)."""
        return LOSS_KINDS[self.loss]

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

    # name and behaviour are kept in this (frozen) recipe's __dict__ once read: a ``fit`` reads them thousands of
    # times; equality, hashing and asdict() see the fields only

    @cached_property
    def name(self) -> str:
        if self.adapter.value == self.method.name:
            return self.method.name
        return f"{self.method.name}+{self.adapter.value}"

    @property
    def sequences_per_example(self) -> int:
        return self.method.sequences_per_example

    @cached_property
    def behaviour(self) -> Behaviour:
        return self.method.behaviour


@lru_cache(maxsize=None)
def load_behaviour(name: str) -> Behaviour:
    """The :class:`Behaviour` of module ``name`` (its ``BEHAVIOUR``): a module of this package, else an importable
    module of that name (a dotted path, or a plug-in on ``sys.path``).

    Raises:
        VramplanError: no such module, or it defines no ``BEHAVIOUR``.
    """
    paths = [name] if "." in name else [f"{__name__}.{name}", name]  # this package's module first
    mod, err = None, None
    for path in paths:
        try:
            mod = import_module(path)
            break
        except ModuleNotFoundError as exc:
            if exc.name != path:
                raise VramplanError(f"methods.toml: behaviour {name!r} cannot be imported ({exc})") from None
            err = exc
    if mod is None:
        raise VramplanError(f"methods.toml: behaviour {name!r} cannot be imported ({err})",
                            "a module of vramplan/methods/ or an importable module path") from None
    b = getattr(mod, "BEHAVIOUR", None)
    if not isinstance(b, Behaviour):
        raise VramplanError(f"methods.toml: behaviour module {path!r} defines no BEHAVIOUR (a methods.base.Behaviour)")
    return b


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
            behaviour_name=str(raw.get("behaviour", "sft")),
            listed=bool(raw.get("listed", True)),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise VramplanError(f"methods.toml: method {name!r} is invalid ({exc})") from None
    if md.loss not in LOSSES:
        raise VramplanError(f"methods.toml: method {name!r}: loss must be one of {', '.join(LOSSES)}, not {md.loss!r}")
    if not md.copies or md.copies[0].role is not Role.POLICY or not md.copies[0].trains:
        raise VramplanError(f"methods.toml: method {name!r} must list a training policy copy first")
    if md.sequences_per_example < 1 or any(h not in ("lm", "scalar") for h in (c.head for c in copies)):
        raise VramplanError(f"methods.toml: method {name!r} has a bad sequences_per_example or head")
    if md.rollout != md.behaviour.generates:
        raise VramplanError(f"methods.toml: method {name!r}: rollout = {md.rollout} but its behaviour "
                            f"{md.behaviour_name!r} {'generates' if md.behaviour.generates else 'generates nothing'}")
    return md


@lru_cache(maxsize=None)
def registry() -> dict[str, MethodDef]:
    """All methods, in catalogue order, validated (plus any added by :func:`register`)."""
    return {name: _parse(name, raw) for name, raw in load_data("methods.toml").items()}


def register(name: str, raw: dict[str, Any]) -> MethodDef:
    """Add a method from a methods.toml-shaped entry (``raw``) at run time: a plug-in or a test's toy method.

    Raises:
        VramplanError: the entry is invalid, or ``name`` is taken.
    """
    key = str(name).lower()
    if key in registry():
        raise VramplanError(f"method {key!r} is already registered")
    md = _parse(key, raw)
    registry()[key] = md
    all_options.cache_clear()
    return md


def unregister(name: str) -> None:
    """Remove a method added by :func:`register` (tests)."""
    registry().pop(str(name).lower(), None)
    all_options.cache_clear()


@lru_cache(maxsize=None)
def all_options() -> tuple[Option, ...]:
    """Every registered method's own options, once each by name (the CLI adds their flags)."""
    seen: dict[str, Option] = {}
    for md in registry().values():
        for o in md.behaviour.options:
            seen.setdefault(o.name, o)
    return tuple(seen.values())


def method_options(recipe: "Recipe", values: dict[str, Any] | None, seq: int) -> dict[str, Any]:
    """The options of ``recipe``'s method for one configuration, validated (:meth:`Behaviour.resolve_options`).

    ``values`` may name options of other methods (a search passes the same to each; they are ignored when
    None or when another method declares them); a name no registered method declares is an error.

    Raises:
        VramplanError: an unknown option name, or a value the method refuses.
    """
    values = dict(values or {})
    known = {o.name: o for o in all_options()}
    bad = sorted(k for k in values if k not in known)
    if bad:
        raise VramplanError(f"unknown method option {bad[0]!r}",
                            f"options: {', '.join(sorted(known)) or 'none'}")
    for k, v in values.items():
        known[k].validate(v)
    own = {o.name for o in recipe.behaviour.options}
    return recipe.behaviour.resolve_options({k: v for k, v in values.items() if k in own}, seq)


def method_names() -> list[str]:
    return list(registry())


def default_methods() -> list[str]:
    """The methods ``fit`` and ``matrix --methods all`` show by default (methods.toml ``listed``)."""
    return [n for n, md in registry().items() if md.listed]


def get_method(name: str) -> MethodDef:
    try:
        return registry()[name.lower()]
    except KeyError:
        raise unknown("method", name, registry(), "vramplan methods") from None


def takes_adapter_choice(name: str | None) -> bool:
    """Whether method ``name`` takes an adapter choice (recipes read ``method+adapter``: DPO, PPO); False for
    an unknown name or an SFT method (whose name is its adapter)."""
    md = registry().get(str(name or "").lower())
    return md is not None and md.behaviour.takes_adapter_choice


def names_its_adapter(name: str | None) -> bool:
    """Whether ``name`` is a registered method whose name is its adapter (the supervised family: full, lora,
    qlora...): the run's adapter, not the name, decides what trains. False for a method taking an adapter
    choice (DPO, PPO) or an unknown name."""
    md = registry().get(str(name or "").lower())
    return md is not None and not md.behaviour.takes_adapter_choice


def supervised_word(word: str | None) -> bool:
    """Whether a trainer config's ``method`` / ``trainer`` value ``word`` means supervised fine-tuning of the
    adapter the run loads (a behaviour's :attr:`~vramplan.methods.base.Behaviour.config_names`: ``"sft"``)."""
    return word is not None and names_its_adapter(method_named_by("config_names", word))


def method_named_by(attribute: str, value: str) -> str | None:
    """The first registered method whose behaviour lists ``value`` in ``attribute`` (``"trainer_names"``,
    ``"axolotl_rl"``, ``"report_names"``), or None: how trainer configs and reports name a method."""
    key = str(value).lower()
    for name, md in registry().items():
        if any(str(v).lower() == key for v in getattr(md.behaviour, attribute, ())):
            return name
    return None


def trainer_variant(method: str | None, get) -> str | None:
    """``method``, or the registered variant its trainer config selects (``Behaviour.variants``): ``get(key)``
    reads the config (None when absent). DPO with ``precompute_ref_log_probs=True`` -> ``dpo-precomputed``."""
    md = registry().get(str(method).lower()) if method else None
    if md is None:
        return method
    for key, value, other in md.behaviour.variants:
        got = get(key)
        if got is None:
            continue
        hit = bool(got) and str(got).lower() not in ("false", "0", "no") if value is True else _same(got, value)
        if hit and other in registry():
            return other
    return method


def _same(got, value) -> bool:
    try:
        return float(got) == float(value)
    except (TypeError, ValueError):
        return str(got).lower() == str(value).lower()


def method_flagged(attribute: str, data: dict) -> str | None:
    """The first registered method one of whose behaviour's ``attribute`` keys (``"axolotl_flags"``) is true in
    ``data``, or None."""
    for name, md in registry().items():
        for key in getattr(md.behaviour, attribute, ()):
            v = data.get(key)
            if v is True or str(v).lower() in ("true", "1", "yes"):
                return name
    return None


def report_words() -> list[tuple[str, str]]:
    """(word, method) for every registered method's :attr:`~vramplan.methods.base.Behaviour.report_names`."""
    return [(w.lower(), name) for name, md in registry().items() for w in md.behaviour.report_names]


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


def sixteen_bit_twin(name: str) -> str | None:
    """The recipe ``name`` over a 16-bit base instead of its NF4 one (``dpo+qlora`` -> ``dpo+lora``,
    ``qlora`` -> ``lora``): a 4-bit recipe's step is its twin's plus the dequantisation (the calibrated
    step-time model). None when ``name``'s base is not NF4 or ``name`` is no recipe."""
    try:
        recipe = resolve(name)
    except VramplanError:
        return None
    twin = recipe.adapter.sixteen_bit
    if twin is None:
        return None
    named_by_adapter = recipe.name == recipe.adapter.value  # an SFT method named after its adapter (qlora)
    return resolve(twin.value).name if named_by_adapter else resolve(recipe.method, twin).name


_RESOLVED: dict = {}


def resolve(method: str | MethodDef | Recipe, adapter: str | Adapter | None = None) -> Recipe:
    """Resolve ``method`` (+ ``adapter`` for DPO/PPO) into the copies held in memory.

    A frozen copy next to a QLoRA policy is quantised too (the same loading recipe).
    A copy with ``shares_base`` next to a PEFT policy is the policy's base with the
    adapter disabled (TRL's default), so it is not held separately.

    A recipe named by text (method and adapter strings) is kept per process, for as long as the registry holds
    the very method it was resolved from (``register``/``unregister`` or a reloaded registry resolve anew): a
    ``fit`` resolves the same few hundreds of times. Recipes are frozen; the kept one is equal to a new one.
    """
    if isinstance(method, Recipe):
        return method
    if type(method) is str and (adapter is None or type(adapter) is str):
        key = (method, adapter)
        kept = _RESOLVED.get(key)
        if kept is not None and registry().get(kept[0]) is kept[1]:
            return kept[2]
        recipe = _resolve(method, adapter)
        if len(_RESOLVED) > 512:
            _RESOLVED.clear()
        _RESOLVED[key] = (recipe.method.name, recipe.method, recipe)
        return recipe
    return _resolve(method, adapter)


def _resolve(method: str | MethodDef, adapter: str | Adapter | None) -> Recipe:
    """:func:`resolve`, worked out anew."""
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
