"""The training configuration every layer takes: what the user controls.

One :class:`TrainConfig` feeds ``vramplan.estimate`` (analytic), ``vramplan.dryrun``
(meta-device tracing) and the calibration runner (real steps), so the three are always
asked the same question. Build it with :func:`make_config`, which validates and fills
the defaults (including the PEFT defaults rank 8, alpha 8, the model type's default
targets).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from typing import Any

from .attention import AttentionKernel, attention_kernel
from .errors import VramplanError, unknown
from .methods import Adapter, Recipe, resolve
from .methods import method_options as method_options_for
from .models import ModelSpec, get_model
from .optimizers import DEFAULT_OPTIMIZER, get_optimizer
from .precision import DEFAULT_REGIME, get_regime
from .request import ATTENTION, DEFAULT_ATTENTION, ConfigRequest
from .stacks import DEFAULT_STACK, behaviour_on, effective_regime, get_stack, parse_techniques, parse_versions


class _AttentionOf:
    """``TrainConfig.attention``: the definition of its ``attn`` (:func:`vramplan.attention.attention_kernel`, what
    the planning path reads of the kernel), looked up on first read and kept in the config's ``__dict__`` -- a
    non-data descriptor, so later reads find the kept value; ``with_`` drops it when ``attn`` changes
    (:data:`_RESOLVED_FROM`). Not ``functools.cached_property``, which takes a lock on every first read before
    Python 3.12: a fit resolves a few thousand configurations' attention."""

    def __get__(self, cfg, owner=None) -> AttentionKernel:
        if cfg is None:
            return self
        kernel = cfg.__dict__["attention"] = attention_kernel(cfg.attn)
        return kernel


@dataclass(frozen=True)
class TrainConfig:
    """One training configuration. Shapes are per micro-batch on one GPU.

    Attributes:
        method: registry name (full, lora, qlora, dora, ia3, dpo, ppo).
        adapter: adapter choice (DPO/PPO take full|lora|qlora|dora|ia3).
        batch: micro-batch size (examples; DPO doubles it into chosen + rejected sequences).
        seq: tokens per sequence (PPO: prompt + response).
        grad_accum: gradient accumulation steps (global batch and throughput; above 1 the earlier micro-batches'
            gradients stay alive through each later forward and backward: vramplan.memory.step_memory).
        rank, alpha, dropout: LoRA/DoRA hyper-parameters (PEFT defaults 8, 8, 0.0).
        targets: target module names, or ("all-linear",); empty means the model type's default.
        grad_ckpt: gradient checkpointing (HF ``gradient_checkpointing_enable``, non-reentrant).
        optimizer: a name of vramplan/data/optimizers.toml (adamw, adamw_8bit, paged_adamw_8bit, ...).
        precision: bf16 | bf16-mixed | fp16-mixed | fp32 (see vramplan.precision).
        attn: eager | sdpa | flash (attention implementation).
        framework: training stack (hf = transformers + PEFT; torchtune, unsloth, litgpt: see data/stacks.toml).
        techniques: memory-saving techniques (chunked_ce, liger_ce, act_offload, selective_ckpt,
            opt_in_bwd, opt_offload, padding), on top of the stack's own.
        double_quant: QLoRA double quantisation of the NF4 constants (default on).
        ppo_response: PPO response tokens generated per sequence (default seq // 2): PPO's option
            (vramplan/methods/ppo.py), kept as an attribute for the API and JSON it always had.
        options: the method's other options (vramplan.methods.base.Option), as sorted (name, value)
            pairs: read them with :meth:`option`.
        versions: (package, version) pairs the run uses (``--stack-version``); a package not named
            takes its installed version, else the latest behaviour (stacks.toml [behaviours]).
    """

    method: str = "lora"
    adapter: str = "lora"
    batch: int = 1
    seq: int = 2048
    grad_accum: int = 1
    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    grad_ckpt: bool = False
    optimizer: str = DEFAULT_OPTIMIZER
    precision: str = DEFAULT_REGIME
    attn: str = DEFAULT_ATTENTION
    framework: str = DEFAULT_STACK
    techniques: tuple[str, ...] = ()
    double_quant: bool = True
    ppo_response: int | None = None
    versions: tuple[tuple[str, str], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if isinstance(self.options, dict) or not all(isinstance(o, tuple) for o in self.options):
            pairs = self.options.items() if isinstance(self.options, dict) else self.options
            object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in pairs)))
        # a dict or lists (a config read back from JSON) become sorted pairs, so the config stays hashable
        if not (isinstance(self.versions, tuple) and all(isinstance(v, tuple) for v in self.versions)):
            object.__setattr__(self, "versions", parse_versions(self.versions))

    def option(self, name: str, default: Any = None) -> Any:
        """The value of method option ``name``: a TrainConfig attribute of that name, else :attr:`options`."""
        if name in _FIELDS:
            value = getattr(self, name)
            return default if value is None else value
        return dict(self.options).get(name, default)

    def behaves(self, name: str) -> bool:
        """Whether the version-dependent behaviour ``name`` (stacks.toml [behaviours]) applies to this
        configuration: its stack runs the package, at the version given in ``versions``, else the installed
        one, else the latest (off)."""
        return behaviour_on(name, self.framework, self.versions)

    # recipe, stack, regime and attention are resolved once per (immutable) config and kept in its __dict__:
    # the search reads them thousands of times; equality, hashing and asdict() see the fields only

    @cached_property
    def recipe(self) -> Recipe:
        r = resolve(self.method, self.adapter)
        return r.behaviour.recipe_for(r, self) if self.options else r

    attention = _AttentionOf()  # not a field (no annotation): the definition of ``attn``, kept once read

    @cached_property
    def stack(self):
        return get_stack(self.framework)

    @cached_property
    def regime(self):
        """The precision regime as this config's stack runs it (adapter dtype, optimizer kernel)."""
        regime = effective_regime(self.precision, self.framework)
        floating_base = not self.recipe.adapter.quantized_base or self.stack.float_quant_storage
        if floating_base and self.behaves("peft_adapter_base_dtype") and regime.autocast is None:
            # PEFT < 0.12 moved LoRA layers to the base weight's floating dtype (stacks.toml [behaviours]); a
            # 4-bit weight packed in a floating quant_storage (fsdp_qlora: bf16) counts as floating
            from dataclasses import replace

            regime = replace(regime, adapter_dtype=regime.frozen_dtype)
        if regime.training_loop.fused_optimizer and self.behaves("torchtune_foreach_adamw"):
            # torchtune < 0.3.1 configs build AdamW without fused=True: the foreach kernel (stacks.toml [behaviours])
            from dataclasses import replace

            regime = replace(regime, runner="loop")
        return regime

    def uses(self, technique: str) -> bool:
        """Whether a memory-saving technique is on (asked for, or the stack's default)."""
        return technique in self.techniques or technique in self.stack.techniques

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["techniques"] = list(self.techniques)
        if self.options:
            d["options"] = dict(self.options)
        else:
            del d["options"]  # the JSON of a method without options of its own is unchanged
        return d

    def to_json(self) -> dict:
        """The JSON of :func:`vramplan.results.jsonable` (tuples as lists); ``options`` only when the method has some,
        so the JSON of a method without options of its own is what it always was."""
        from .results import jsonable

        return {f.name: (dict(self.options) if f.name == "options" else jsonable(getattr(self, f.name)))
                for f in fields(self) if f.name != "options" or self.options}

    def with_(self, **changes) -> "TrainConfig":
        """This configuration with ``changes``: fields, or method options (set in :attr:`options`).

        The resolved recipe, stack and regime are carried over where the fields they are read from
        (:data:`_RESOLVED_FROM`) are unchanged: a search derives hundreds of configurations.
        """
        drop = _DROP.get(tuple(changes))
        if drop is None:
            drop = _drop_after(tuple(changes))
        if drop is _REPLACE:
            return self._with_options(changes)
        new = object.__new__(TrainConfig)
        d = new.__dict__
        d.update(self.__dict__)
        d.update(changes)
        for name in drop:
            d.pop(name, None)
        return new

    def _with_options(self, changes: dict) -> "TrainConfig":
        """:meth:`with_` of changes naming method options, ``versions`` or ``options``: a new config normalised by
        ``__post_init__`` (nothing resolved carried)."""
        extra = {k: changes.pop(k) for k in list(changes) if k not in _FIELDS}
        if extra:
            opts = dict(changes.get("options", self.options))
            for k, v in extra.items():
                if v is None:
                    opts.pop(k, None)
                else:
                    opts[k] = v
            changes["options"] = tuple(sorted(opts.items()))
        return replace(self, **changes)

    def __hash__(self) -> int:
        """The hash of the fields (as the dataclass's), worked out once per (immutable) config and kept in its
        ``__dict__``: a search keys its dicts and sets on configurations tens of thousands of times."""
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(_field_values(self.__dict__))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        """Pickled without the kept hash (a string's hash differs from process to process)."""
        state = dict(self.__dict__)
        state.pop("_hash", None)
        return state

    def with_techniques(self, techniques) -> "TrainConfig":
        """This configuration with exactly ``techniques`` requested, validated as :func:`make_config` does.

        Raises:
            VramplanError: an unknown technique, chunked_ce with liger_ce, opt_in_bwd with accumulation.
        """
        techs = parse_techniques(techniques)
        _check_techniques(techs, self.grad_accum)
        # (with_: the resolved recipe, stack, regime and attention carried, none of which reads the techniques)
        return self.with_(techniques=techs)


_FIELDS = frozenset(f.name for f in fields(TrainConfig))
_FIELD_ORDER = tuple(f.name for f in fields(TrainConfig))
#: a config's ``__dict__`` -> the tuple of its field values, in field order (what the dataclass hashes)
_field_values = operator.itemgetter(*_FIELD_ORDER)
_BUT: dict[tuple[str, ...], Any] = {}  # field names left out -> the getter of the others (fields_but)


def fields_but(cfg: TrainConfig, *names: str) -> tuple:
    """``cfg``'s field values but ``names``, in field order: equal for two configurations exactly when they are
    equal but in those fields (``cfg.with_(**{n: v ...})`` equal for any fixed ``v``), without building that
    configuration and hashing it anew (a search keys what does not read those fields on it: the floors without
    checkpointing and attention, the activation terms and step work without the optimiser)."""
    get = _BUT.get(names)
    if get is None:
        get = _BUT[names] = operator.itemgetter(*(n for n in _FIELD_ORDER if n not in names))
    return get(cfg.__dict__)


def _check_techniques(techs: tuple[str, ...], grad_accum: int) -> None:
    """Rules between techniques and the other settings (names are already validated)."""
    if "opt_in_bwd" in techs and grad_accum > 1:
        raise VramplanError("opt_in_bwd steps the optimizer inside backward, so it cannot accumulate gradients",
                            "use --grad-accum 1 or drop opt_in_bwd")


#: The fields each resolved value a config keeps (``recipe``, ``stack``, ``regime``, ``attention``) is read from.
_RESOLVED_FROM = {"recipe": ("method", "adapter"), "stack": ("framework",),
                  "regime": ("precision", "framework", "adapter", "versions"), "attention": ("attn",)}
_STALE: dict[frozenset, tuple[str, ...]] = {}
_REPLACE = ("<replace>",)  # _DROP's mark: the changes go through dataclasses.replace (TrainConfig._with_options)
#: the names of :meth:`TrainConfig.with_`'s changes, in the order given -> what the new config drops from the
#: ``__dict__`` it copies (the kept hash and the resolved values they make stale), or :data:`_REPLACE`
_DROP: dict[tuple[str, ...], tuple[str, ...]] = {}


def _stale_after(changed: frozenset) -> tuple[str, ...]:
    """The resolved values (:data:`_RESOLVED_FROM`) that changing the fields ``changed`` makes stale, worked
    out once per set of field names (a search changes the same few fields thousands of times)."""
    stale = _STALE.get(changed)
    if stale is None:
        stale = _STALE[changed] = tuple(name for name, read in _RESOLVED_FROM.items() if not changed.isdisjoint(read))
    return stale


def _drop_after(names: tuple[str, ...]) -> tuple[str, ...]:
    """:data:`_DROP` of the change names ``names``, worked out and kept: :data:`_REPLACE` when one is not a
    field (a method option) or is ``versions``/``options`` (normalised by ``__post_init__``), else the kept hash
    and :func:`_stale_after` of them."""
    changed = frozenset(names)
    if not _FIELDS.issuperset(changed) or "versions" in changed or "options" in changed:
        drop = _REPLACE
    else:
        drop = ("_hash",) + _stale_after(changed)
    if len(_DROP) < 4096:
        _DROP[names] = drop
    return drop


def resolve_targets(model: ModelSpec, targets) -> tuple[str, ...]:
    """Expand ``targets`` (None/empty: the model type's default; "all-linear"; names) into module names.

    "all-linear" follows PEFT: every ``nn.Linear`` in the decoder layers, never the lm_head.
    """
    linear = [l.name for l in model.layer_linears() if l.is_linear]
    if not targets:
        return tuple(t for t in model.lora_targets if t in linear) or tuple(linear[:1])
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    targets = tuple(targets)
    if targets in (("all-linear",), ("all",)):
        return tuple(linear)
    bad = [t for t in targets if t not in linear]
    if bad:
        from .errors import did_you_mean

        raise VramplanError(f"{model.name} has no linear module {bad[0]!r} to adapt",
                            did_you_mean(bad[0], linear) or f"choose from {', '.join(linear)} or all-linear")
    return targets


def check_rank(spec: ModelSpec, targets: tuple[str, ...], rank: int) -> None:
    """Refuse a low-rank adapter's ``rank`` larger than one of the linears it adapts (``targets``, resolved).

    Raises:
        VramplanError: ``rank`` exceeds the smaller side of an adapted linear (1-unit gates aside).
    """
    shapes = {l.name: l for l in spec.layer_linears()}
    for t in targets:
        l = shapes[t]
        # 1-unit gates (Qwen-MoE's shared_expert_gate) take any rank in PEFT; judge the projections
        if min(l.in_features, l.out_features) > 16 and rank > min(l.in_features, l.out_features):
            raise VramplanError(f"rank {rank} is larger than {t} ({l.out_features}x{l.in_features}) of {spec.name}",
                                f"use --rank <= {min(l.in_features, l.out_features)}")


def make_config(model: ModelSpec | str, method: "str | ConfigRequest" = "lora", **settings: Any) -> TrainConfig:
    """Validate user input into a :class:`TrainConfig` for ``model``.

    ``method`` is a method name, or a :class:`~vramplan.request.ConfigRequest` (any request
    with its fields: :class:`~vramplan.request.EstimateRequest` too); ``settings`` are
    ConfigRequest's fields (``batch``, ``seq``, ``rank``, ``targets``, ``method_options``, ...),
    set over the request's. Defaults: gradient checkpointing off (on for QLoRA, as TRL/PEFT's
    ``prepare_model_for_kbit_training`` enables it), alpha = rank (PEFT's default
    ``lora_alpha=8`` with ``r=8``), precision the stack's (bf16-mixed for hf).

    Raises:
        VramplanError: a keyword that is not a ConfigRequest field, non-positive batch/seq/rank, a rank
            larger than an adapted layer, an unknown method/adapter/optimizer/precision/attention, a
            sequence longer than PPO's response allows, a method option the method refuses
            (``method_options``: the method's own knobs, vramplan.methods.base.Option).
    """
    spec = get_model(model)
    if isinstance(method, ConfigRequest):
        req = ConfigRequest.build(method, **settings)
    else:
        req = ConfigRequest.build(method=method, **settings)
    return _config_for(spec, req)


def _config_for(spec: ModelSpec, req: ConfigRequest) -> TrainConfig:
    """:func:`make_config` for a model and a validated request: resolve the names against the catalogues."""
    recipe = resolve(req.method, req.adapter)
    stack = get_stack(req.framework)
    techs = parse_techniques(req.techniques)
    _check_techniques(techs, req.grad_accum)
    get_optimizer(req.optimizer)
    regime = get_regime(req.precision or stack.default_precision)
    tg: tuple[str, ...] = ()
    if recipe.adapter.low_rank:
        tg = resolve_targets(spec, req.targets)
        check_rank(spec, tg, req.rank)
    elif recipe.adapter.ia3:
        tg = tuple(t for t in spec.ia3_targets if t in {l.name for l in spec.layer_linears() if l.is_linear})
        if req.targets:
            tg = resolve_targets(spec, req.targets)
    given = dict(req.method_options or {})
    if req.ppo_response is not None:
        given.setdefault("ppo_response", req.ppo_response)
    opts = method_options_for(recipe, given, req.seq)
    # an option that is a TrainConfig field is set there (as given when the method does not take it); the rest
    # ride in TrainConfig.options
    as_fields = {k: (opts.pop(k) if k in opts else given.get(k)) for k in {*given, *opts} if k in _FIELDS}
    extra = tuple(sorted((k, val) for k, val in opts.items() if val is not None))
    grad_ckpt = recipe.adapter.quantized_base if req.grad_ckpt is None else req.grad_ckpt
    return TrainConfig(
        method=recipe.method.name, adapter=recipe.adapter.value, batch=req.batch, seq=req.seq, grad_accum=req.grad_accum,
        rank=req.rank, alpha=float(req.alpha if req.alpha is not None else req.rank), dropout=float(req.dropout),
        targets=tg, grad_ckpt=bool(grad_ckpt), optimizer=get_optimizer(req.optimizer).name, precision=regime.name,
        attn=req.attn, framework=stack.name, techniques=techs, double_quant=req.double_quant,
        versions=parse_versions(req.versions), options=extra, **as_fields,
    )
