"""Typed requests: what a caller asks the planner, as frozen dataclasses validated in one place (issue 11).

Every public entry point takes one of these instead of a long keyword list:

* :class:`ConfigRequest` -- one training configuration (:func:`vramplan.config.make_config`);
* :class:`EstimateRequest` -- a configuration on a card, GPUs and dataset
  (:func:`vramplan.estimate`, :func:`~vramplan.planner.estimating.per_gpu_peak`, the dry run);
* :class:`FitRequest` -- every method on a card, searching what is not fixed
  (:func:`vramplan.fit`, :func:`~vramplan.planner.fitting.fit_cards`);
* :class:`SearchRequest` -- the settings search of one method (:func:`~vramplan.planner.search.search`,
  :func:`~vramplan.planner.search.what_would_fit`);
* :class:`MatrixRequest` and :class:`GridRequest` -- the feasibility matrix and the raw peak grid.

A setting several requests take is declared once, in a field group (:class:`StackFields`,
:class:`TargetFields`, :class:`RunFields`, :class:`LayoutFields`, :class:`SearchedFields`,
:class:`GridFields`) that the requests inherit, so its name, default and checks have one home.
:class:`ConfigRequest` is the home of a configuration's own settings (fixed values), and
:class:`SearchedFields` of the same settings left to a search (None: searched).

Each validates its fields' types and bounds in ``__post_init__`` (:mod:`vramplan.validate`;
catalogue names are resolved where they are used), so a request that exists is well formed.
The CLI builds them (``vramplan.cli.request_from_args``) and the Python API builds the same
ones from keywords with :meth:`Request.build`, which refuses a keyword that is not a declared
field (a :class:`~vramplan.errors.VramplanError` with a did-you-mean hint).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Sequence

from . import validate as v
from .attention import KERNELS as ATTENTION_KERNELS
from .attention import default_kernel
from .errors import VramplanError, did_you_mean
from .optimizers import DEFAULT_OPTIMIZER
from .stacks import DEFAULT_STACK
from .verdict import DEFAULT_MARGIN

#: Attention implementations a configuration may name (their definitions: :mod:`vramplan.attention`).
ATTENTION = tuple(ATTENTION_KERNELS)
#: The attention implementation a configuration runs when none is asked for (``sdpa``).
DEFAULT_ATTENTION = default_kernel().name
#: The matrix's default benchmark grid: 5 sequence lengths x 8 micro-batches (:func:`vramplan.matrix.peak_grid`).
BENCH_SEQS = (512, 1024, 2048, 4096, 8192)
BENCH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
#: The largest micro-batch the matrix searches (``vramplan.planner.limits.BATCH_GRID[-1]``).
MATRIX_MAX_BATCH = 1024


@dataclass(frozen=True)
class Request:
    """A request's common behaviour: built from keywords checked against the declared fields."""

    _what: ClassVar[str] = "request"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def build(cls, base: "Request | None" = None, /, **given: Any):
        """A ``cls`` from ``base`` (a request: its fields shared with ``cls`` are carried over) with ``given`` set.

        Raises:
            VramplanError: a keyword that is not a field of ``cls`` (with the nearest field name as a hint),
                a ``base`` that is not a request, or an invalid value (the fields' validation).
        """
        names = cls.field_names()
        bad = [k for k in given if k not in names]
        if bad:
            hint = did_you_mean(bad[0], names) or f"{cls.__name__} takes: {', '.join(names)}"
            raise VramplanError(f"{cls._what} has no setting {bad[0]!r}", hint)
        if base is None:
            return cls(**given)
        if isinstance(base, cls):
            return replace(base, **given) if given else base
        if isinstance(base, Request):
            carried = {f.name: getattr(base, f.name) for f in fields(base) if f.name in names}
            return cls(**{**carried, **given})
        raise VramplanError(f"expected a {cls.__name__} or keyword settings, got {type(base).__name__}")

    def with_(self, **changes: Any):
        """This request with ``changes`` (declared fields only; validated again)."""
        return type(self).build(self, **changes)

    def pick(self, *names: str) -> dict[str, Any]:
        """``{name: value}`` of the named fields (all of them when none are named)."""
        return {n: getattr(self, n) for n in (names or self.field_names())}

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


def _targets(targets: Any) -> None:
    if targets is not None and not isinstance(targets, (str, list, tuple)):
        raise VramplanError(f"targets must be a comma list or a list of module names, got {type(targets).__name__}")
    if isinstance(targets, (list, tuple)) and not all(isinstance(t, str) for t in targets):
        raise VramplanError("targets must be module names (strings)")


def _method_options(options: Any) -> None:
    if options is not None and not isinstance(options, dict):
        raise VramplanError(f"method_options must be a dict of option name -> value, got {type(options).__name__}")


def _known_precision(precision: Any) -> None:
    if v.name_text(precision, "precision", none_ok=True) is not None:
        from .precision import get_regime

        get_regime(precision)  # an unknown precision is an error before any work


# -- field groups: each setting that several requests take is declared once, in one group ---------------
# A request composes the groups it takes (dataclass inheritance: a group's fields become the request's own,
# so keyword callers and ``Request.build`` see one flat set of names); each group checks its own fields.

@dataclass(frozen=True)
class StackFields:
    """How the run executes: ``framework`` (the training stack, vramplan/data/stacks.toml), ``techniques``
    (the memory techniques it applies) and ``method_options`` (the methods' own options,
    ``{"num_generations": 8}``; vramplan.methods.base.Option)."""

    framework: str = DEFAULT_STACK
    techniques: Any = None
    method_options: dict | None = None

    def _check_stack(self) -> None:
        v.name_text(self.framework, "framework")
        _method_options(self.method_options)


@dataclass(frozen=True)
class TargetFields:
    """What is planned on what: ``model`` (a catalogue name, alias, HF id, config path or
    :class:`~vramplan.models.ModelSpec`), ``gpu`` (a catalogue card or ``"auto"``), ``gpu_mem`` (a capacity,
    ``"24GiB"``)."""

    model: Any = None
    gpu: Any = None
    gpu_mem: Any = None

    def _check_model(self, what: str) -> None:
        if self.model is None:
            raise VramplanError(f"{what} needs a model", "pass model='7b' (a catalogue name, HF id or config path)")


@dataclass(frozen=True)
class RunFields:
    """The run's size: ``global_batch`` (examples per optimiser step over all GPUs; sets ``grad_accum``),
    ``tokens``/``epochs`` (the dataset, for the time to train)."""

    global_batch: int | None = None
    tokens: Any = None
    epochs: float = 1.0


@dataclass(frozen=True)
class LayoutFields(RunFields):
    """The GPU layout (``vramplan.distributed``): ``gpus``, ``strategy``, ``offload`` (``batch`` is per GPU);
    with the run's size (:class:`RunFields`), checked together (:func:`vramplan.validate.scale`)."""

    gpus: int = 1
    strategy: str | None = None
    offload: str | None = None

    def _check_scale(self) -> None:
        v.scale(gpus=self.gpus, epochs=self.epochs, global_batch=self.global_batch, strategy=self.strategy,
                offload=self.offload)


@dataclass(frozen=True)
class SearchedFields:
    """The settings a search varies: each left None is searched, a value fixes it (``batch``, ``precision``
    None: the stack's default, ``attn``, ``rank``, ``targets``, ``grad_ckpt``, ``optimizer``); ``seq`` is fixed."""

    seq: int = 2048
    batch: int | None = None
    precision: str | None = None
    attn: str | None = None
    rank: int | None = None
    targets: Any = None
    grad_ckpt: bool | None = None
    optimizer: str | None = None

    @property
    def fixed(self) -> dict[str, Any]:
        """The settings the caller fixed (None: searched)."""
        return {n: getattr(self, n) for n in ("grad_ckpt", "optimizer", "attn", "rank", "targets")}


@dataclass(frozen=True)
class GridFields(StackFields):
    """The axes of the matrix and the peak grid: ``models``/``methods``/``gpus`` (``"all"`` or comma lists /
    lists of names; methods: ``method+adapter``; gpus: capacities too), ``seqs``, and the adapter and
    attention every cell uses."""

    models: Any = "all"
    methods: Any = "all"
    gpus: Any = "all"
    seqs: Any = 2048
    precision: str | None = None
    attn: str = DEFAULT_ATTENTION
    rank: int = 8
    targets: Any = None


# -- the requests -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigRequest(StackFields, Request):
    """One training configuration as a user gives it (:func:`vramplan.config.make_config` resolves it).

    Shapes are per micro-batch on one GPU: ``batch`` examples of ``seq`` tokens, ``grad_accum``
    steps. ``rank``/``alpha``/``dropout``/``targets``: the adapter's (PEFT defaults 8, = rank, 0.0,
    the model type's). ``grad_ckpt`` None: on for a 4-bit base only. ``precision`` None: the
    stack's default. ``method_options`` (:class:`StackFields`): the method's own options;
    ``ppo_response`` is PPO's, kept as a field for the API it had.
    ``versions``: package versions the run uses (``"bitsandbytes=0.42.0"`` or a dict).
    """

    _what: ClassVar[str] = "a training configuration"

    method: str = "lora"
    adapter: str | None = None
    batch: int = 1
    seq: int = 2048
    grad_accum: int = 1
    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: Any = None
    grad_ckpt: bool | None = None
    optimizer: str = DEFAULT_OPTIMIZER
    precision: str | None = None
    attn: str = DEFAULT_ATTENTION
    double_quant: bool = True
    ppo_response: int | None = None
    versions: Any = None

    def __post_init__(self):
        self._check_config()

    def _check_config(self) -> None:
        """The configuration's fields, in the order make_config always checked them."""
        v.name_text(self.method, "method")
        v.name_text(self.adapter, "adapter", none_ok=True)
        self._set("batch", v.integer(self.batch, "batch"))
        self._set("seq", v.integer(self.seq, "seq"))
        self._set("grad_accum", v.integer(self.grad_accum, "grad-accum"))
        self._set("rank", v.integer(self.rank, "rank"))
        self._set("alpha", v.real(self.alpha, "alpha", lo=-v.LIMITS["alpha"], none_ok=True))
        self._set("dropout", v.real(self.dropout, "dropout", lo=0.0, hi=1.0, hi_open=True))
        self._set("grad_ckpt", v.flag(self.grad_ckpt, "grad_ckpt"))
        self._set("double_quant", v.flag(self.double_quant, "double_quant", none_ok=False))
        self._set("ppo_response", v.integer(self.ppo_response, "ppo-response", none_ok=True))
        _method_options(self.method_options)
        v.name_text(self.framework, "framework")
        v.name_text(self.optimizer, "optimizer")
        v.name_text(self.precision, "precision", none_ok=True)
        _targets(self.targets)
        self._set("attn", v.choice(self.attn, "attention implementation", ATTENTION))

    def config_request(self, **changes: Any) -> "ConfigRequest":
        """The :class:`ConfigRequest` of this request (a subclass adds card and scale fields), with ``changes``."""
        return ConfigRequest.build(**{**{f.name: getattr(self, f.name) for f in fields(ConfigRequest)}, **changes})


@dataclass(frozen=True)
class EstimateRequest(ConfigRequest, TargetFields, LayoutFields):
    """A configuration (:class:`ConfigRequest`'s fields) on a card (:class:`TargetFields`), over GPUs, for a
    dataset (:class:`LayoutFields`)."""

    _what: ClassVar[str] = "an estimate request"

    def __post_init__(self):
        self._check_model("an estimate")
        self._check_scale()
        self._check_config()


@dataclass(frozen=True)
class FitRequest(SearchedFields, TargetFields, LayoutFields, StackFields, Request):
    """Every method (``methods``, default the catalogue's) on a card: a setting left None is searched
    (:class:`SearchedFields`).

    ``margin``: the fraction of the card kept free (None: :data:`vramplan.verdict.DEFAULT_MARGIN`).
    ``top``: ranked plans per method in ``to_json()``. ``advise``: False skips the technique advice and
    other setups. ``method_options``: the methods' own options, each applied to the methods that declare
    it. The rest as :class:`EstimateRequest`.
    """

    _what: ClassVar[str] = "a fit request"

    methods: Sequence[str] | None = None
    margin: float | None = None
    top: int = 20
    advise: bool = True

    def __post_init__(self):
        self._check_model("fit")
        self._check_scale()
        v.integer(self.seq, "seq")
        v.integer(self.batch, "batch", none_ok=True)
        v.integer(self.rank, "rank", none_ok=True)
        v.integer(self.top, "top")
        v.flag(self.grad_ckpt, "grad_ckpt")
        v.real(self.margin, "margin", lo=0.0, hi=1.0, hi_open=True, none_ok=True)
        v.choice(self.attn, "attention implementation", ATTENTION, none_ok=True)
        if self.optimizer is not None:
            from .optimizers import get_optimizer

            get_optimizer(v.name_text(self.optimizer, "optimizer"))
        _known_precision(self.precision)
        self._check_stack()
        if isinstance(self.methods, str):
            self._set("methods", [m.strip() for m in self.methods.split(",") if m.strip()] or None)


@dataclass(frozen=True)
class SearchRequest(SearchedFields, RunFields, StackFields, Request):
    """The settings search of one method on one card (:func:`vramplan.planner.search.search`).

    ``parallels``: the GPU layouts tried (None: one GPU). ``totals``: a shared
    :class:`~vramplan.planner.limits.DeviceTotals` cache (None: a fresh one). ``whole_card_bytes``: the
    whole card's bytes when the card searched is the part a step has (GRPO's colocated vLLM holds the rest,
    a fraction of the whole card: whether its weights load there is judged on it); None: the card searched is
    whole. The other fields as :class:`FitRequest` (None searches a setting); ``adapter`` None searches the
    method's default adapter and its 4-bit fallback.
    """

    _what: ClassVar[str] = "a search request"

    adapter: str | None = None
    parallels: Any = None
    margin: float = DEFAULT_MARGIN
    ppo_response: int | None = None
    totals: Any = None
    whole_card_bytes: int | None = None

    def __post_init__(self):
        if not 0.0 <= self.margin < 1.0:
            raise VramplanError(f"margin must be in [0, 1), got {self.margin!r}", "use e.g. --margin 0.1 for 10%")


@dataclass(frozen=True)
class MatrixRequest(GridFields, Request):
    """Every model x method x card x sequence length (:func:`vramplan.matrix.feasibility_matrix`).

    The axes as :class:`GridFields`; ``seqs``: one length or several. ``batch``: the micro-batch of the
    verdict. ``ladder``: (gradient checkpointing, optimizer) settings tried in order (None:
    :data:`vramplan.matrix.SETTINGS_LADDER`). ``method_options``: the methods' own options, each applied to
    the methods that declare it.
    """

    _what: ClassVar[str] = "a matrix request"

    batch: int = 1
    ladder: Any = None

    def __post_init__(self):
        v.integer(self.batch, "batch", hi=MATRIX_MAX_BATCH)
        v.integer(self.rank, "rank")
        v.name_text(self.attn, "attention implementation")
        _known_precision(self.precision)
        self._check_stack()


@dataclass(frozen=True)
class GridRequest(GridFields, Request):
    """The raw peak grid (:func:`vramplan.matrix.peak_grid`): models x methods x settings x cards x seqs x batches.

    ``settings``: (gradient checkpointing, optimizer) pairs (None: each method's default). The
    other fields as :class:`MatrixRequest`.
    """

    _what: ClassVar[str] = "a peak-grid request"

    seqs: Any = BENCH_SEQS
    batches: Any = BENCH_BATCHES
    settings: Any = None


def call_request(cls, first: Any, first_field: str, given: dict[str, Any]):
    """The request of an API call whose first argument is either a request or the value of ``first_field``.

    ``given``: the call's other arguments and keywords; a value of None among the positional
    defaults (``method``, ``gpu``...) is left out by the caller, so it does not override a request.
    """
    if isinstance(first, Request):
        return cls.build(first, **given)
    return cls.build(**({first_field: first} if first is not None else {}), **given)
