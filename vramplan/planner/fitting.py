"""``fit``: every method on one card, and ``fit_cards``: every card (layer 5 of :mod:`vramplan.planner`).

For each method :func:`fit` runs the settings search (:mod:`vramplan.planner.search`), the
limits of the chosen plan (:mod:`vramplan.planner.limits`) and the technique advice
(:mod:`vramplan.planner.techniques`), and returns dataclasses that ``--json`` serialises
unchanged. Numpy only; the search and the throughput model load on the first call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import make_config
from ..errors import CardUnsupportedError, VramplanError
from ..gpus import GPUSpec, get_gpu
from ..methods import default_methods
from ..models import ModelSpec, get_model
from ..request import DEFAULT_ATTENTION, FitRequest, SearchRequest, call_request
from ..results import Estimate
from ..verdict import DEFAULT_MARGIN, LIKELY_OVER, Verdict, classify
from .checks import accum_for, check_card, moe_qlora_note, resolve_gpu, techniques_text
from .estimating import estimate_config, step_capacity

if TYPE_CHECKING:
    from ..prices import Price
    from .search import Plan, Suggestion
    from .techniques import TechniqueAdvice

@dataclass
class FitRow:
    """One method's verdict on a card: the best plan (fastest that fits with the margin) and its alternatives.

    ``estimate`` is the chosen plan's full estimate: the best plan, else the fastest that fits
    without the margin ("tight"), else the least-memory one (to show how far off it is).
    ``plans`` ranks every settings combination tried (:class:`vramplan.planner.search.Plan`);
    ``suggestions`` say what would fit when nothing does; ``techniques``
    (:class:`vramplan.planner.techniques.TechniqueAdvice`) what each memory-saving technique saves on the
    chosen plan and, when it is not comfortable, the cheapest set that makes it fit.

    ``fits`` is the central prediction of the chosen plan (``peak <= capacity``); ``verdict`` is what the
    user is told, with the band (:mod:`vramplan.verdict`): a plan a few percent over the card but inside
    the band's lower end is "tight" (shown as "likely over": :func:`vramplan.verdict.label`), not "no".
    """

    method: str                                        # the chosen plan's method (qlora for LoRA's fallback)
    adapter: str
    fits: bool
    estimate: Estimate
    max_batch: int                                     # comfortable (vramplan.planner.limits.band_limits)
    max_seq: int                                       # comfortable, at micro-batch 1
    settings: dict
    notes: list[str] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)    # ranked (vramplan.planner.search.Plan)
    best: Plan | None = None                           # the recommended Plan, or None
    chosen: Plan | None = None                         # the Plan shown (best, tight or smallest)
    suggestions: list[Suggestion] = field(default_factory=list)  # what would fit (search.what_would_fit)
    techniques: TechniqueAdvice | None = None          # vramplan.planner.techniques.TechniqueAdvice
    alternatives: list[Suggestion] = field(default_factory=list)  # other stacks/precisions that fit (search.other_setups)
    requested: str = ""                                # the method asked for (fit's methods=); "" = method
    limits: Any = None                                 # the method's own limits (Behaviour.limits: GRPO's G x completion)
    max_batch_tight: int = 0                           # the largest that may fit (tight: the card inside the band)
    max_seq_tight: int = 0

    def __post_init__(self):
        self.requested = self.requested or self.method

    @property
    def recipe(self) -> str:
        """The chosen plan's recipe: ``lora``, ``qlora``, ``dpo+qlora`` (a fallback says what it became)."""
        return self.estimate.config.recipe.name

    @property
    def label(self) -> str:
        """``lora``, or ``lora → qlora`` when the requested method fell back to another recipe."""
        fell_back = self.chosen is not None and getattr(self.chosen, "fallback", None)
        return f"{self.requested} → {self.recipe}" if fell_back else self.requested

    @property
    def verdict(self) -> Verdict:
        """comfortable / tight / no (:mod:`vramplan.verdict`, the same thresholds as ``vramplan matrix``)."""
        from ..verdict import verdict_of

        return verdict_of(self.estimate)  # the estimate's own band (extra["band"]) and constraints

    @property
    def verdict_text(self) -> str:
        """Where the chosen plan stands against the card, with the band (:func:`vramplan.verdict.advice`)."""
        from ..bands import band_for_estimate
        from ..verdict import advice, unmet_text

        b = band_for_estimate(self.estimate)
        text = advice(self.estimate.peak_bytes, self.estimate.capacity_bytes, b.hi, b.lo)
        unmet = unmet_text(self.estimate.constraints)
        return f"{self.verdict.value}: the training step alone: {text}; but {unmet}" if unmet else text

    @property
    def tokens_per_s(self) -> float | None:
        return self.estimate.tokens_per_s

    @property
    def step_time_s(self) -> float | None:
        return self.estimate.step_time_s

    @property
    def time_to_train_s(self) -> float | None:
        return self.estimate.time_to_train_s

    @property
    def gpu_hours(self) -> float | None:
        return self.estimate.gpu_hours

    def to_json(self, top: int | None = None) -> dict:
        plans = self.plans if top is None else self.plans[:top]
        return {"method": self.method, "requested": self.requested, "recipe": self.recipe, "adapter": self.adapter,
                "fits": self.fits, "verdict": self.verdict.value, "verdict_text": self.verdict_text,
                "peak_bytes": self.estimate.peak_bytes,
                "peak_gib": round(self.estimate.peak_gib, 3), "capacity_bytes": self.estimate.capacity_bytes,
                "max_batch": self.max_batch, "max_seq": self.max_seq, "max_batch_tight": self.max_batch_tight,
                "max_seq_tight": self.max_seq_tight, "settings": self.settings, "notes": self.notes,
                "tokens_per_s": None if self.tokens_per_s is None else round(float(self.tokens_per_s), 1),
                "step_time_s": None if self.step_time_s is None else round(float(self.step_time_s), 6),
                "time_to_train_s": None if self.time_to_train_s is None else round(float(self.time_to_train_s), 1),
                "gpu_hours": None if self.gpu_hours is None else round(float(self.gpu_hours), 3),
                "recommended": None if self.best is None else self.best.to_json(),
                "plans": [p.to_json() for p in plans], "plans_considered": len(self.plans),
                **({"method_limits": self.limits.to_json()} if self.limits is not None else {}),
                "suggestions": [x.to_json() for x in self.suggestions],
                "techniques": None if self.techniques is None else self.techniques.to_json(),
                "alternatives": [x.to_json() for x in self.alternatives],
                "estimate": self.estimate.to_json()}


@dataclass
class FitReport:
    """What :func:`fit` returns: one :class:`FitRow` per method on the card (or cards), the request it answers
    and the assumptions behind it; ``to_json()`` is ``vramplan fit --json``."""

    model: str
    model_resolved_from: str | None
    gpu: str
    capacity_bytes: int
    seq: int
    rows: list[FitRow]
    assumptions: list[str]
    gpus: int = 1
    strategy: str | None = None
    offload: str = "none"
    margin: float = DEFAULT_MARGIN
    global_batch: int | None = None
    tokens: float | None = None
    epochs: float = 1.0
    top: int = 20  # ranked plans per method in to_json()
    framework: str = "hf"
    techniques: tuple[str, ...] = ()  # requested on every plan (the stack's own are in stacks.toml)

    def to_json(self) -> dict:
        return {"model": self.model, "model_resolved_from": self.model_resolved_from, "gpu": self.gpu,
                "framework": self.framework, "techniques": list(self.techniques),
                "capacity_bytes": self.capacity_bytes, "seq": self.seq, "gpus": self.gpus, "strategy": self.strategy,
                "offload": self.offload, "margin": self.margin, "global_batch": self.global_batch,
                "tokens": self.tokens, "epochs": self.epochs,
                "rows": [r.to_json(self.top) for r in self.rows], "assumptions": self.assumptions}


def _step_card(spec: ModelSpec, card: GPUSpec, method: str, seq: int, method_options: dict | None) -> GPUSpec:
    """``card`` as a step of ``method`` with ``method_options`` has it: its :func:`step_capacity` (less a colocated
    engine's share, GRPO's vLLM), or ``card`` itself when no engine shares it."""
    from dataclasses import replace

    from ..methods import resolve

    if not resolve(method).behaviour.options:
        return card
    try:
        capacity = step_capacity(card, make_config(spec, method, seq=seq, method_options=method_options))
    except VramplanError:
        return card
    return card if capacity == card.memory_bytes else replace(card, memory_bytes=capacity)


def fit(model: "str | ModelSpec | FitRequest | None" = None, gpu: str | GPUSpec | None = None,
        **settings: Any) -> FitReport:
    """Every method on one card (or ``gpus`` cards): the fastest configuration that fits with a margin.

    Takes a :class:`~vramplan.request.FitRequest` (``fit(FitRequest(model="7b", gpu="rtx4090"))``),
    or its fields as keywords (``fit("7b", "rtx4090", seq=4096)``), or a request with fields changed.
    For each method :func:`vramplan.planner.search.search` tries every combination of gradient
    checkpointing, optimiser (AdamW, 8-bit, paged 8-bit), attention implementation, LoRA rank
    and targets, the LoRA-to-QLoRA fallback and, on several GPUs without ``strategy``, every
    sharding strategy, each over all micro-batches (with accumulation to ``global_batch`` when
    given), and ranks those that fit below ``capacity x (1 - margin)`` by tokens/s. A setting
    given (``attn``, ``rank``, ``targets``, ``grad_ckpt``, ``optimizer``, ``batch``) is
    fixed instead of searched. When nothing fits, the row says what would
    (:func:`vramplan.planner.search.what_would_fit`). Each row also says what every memory-saving
    technique (``vramplan/data/stacks.toml``) not already on would save on the chosen plan and,
    when that plan is not comfortable, the cheapest set that makes it so, with the fastest plan
    under that set (:func:`vramplan.planner.techniques.recommend_techniques`).

    Fields (:class:`~vramplan.request.FitRequest`):
        margin: fraction of the capacity kept free (default :data:`~vramplan.verdict.DEFAULT_MARGIN` = 0.15:
            the recommended plan is always "comfortable", as ``vramplan matrix`` says it).
        tokens, epochs: dataset tokens (``"500M"``) and epochs for time to train and GPU-hours.
        top: ranked plans per method kept in ``to_json()`` (the API keeps them all).
        framework: training stack (hf, torchtune, unsloth, litgpt); its default precision applies
            when ``precision`` is None. techniques: memory-saving techniques every plan uses
            (``"chunked_ce,act_offload"`` or a list).
        method_options: the methods' own options (``{"ppo_response": 512}``; vramplan.methods.base.Option),
            each applied to the methods that declare it.
        advise: False skips the technique advice and the other stacks/precisions (rows'
            ``techniques`` None, ``alternatives`` empty): :func:`fit_cards` ranks cards only.

    Returns:
        :class:`FitReport`; each row's ``estimate`` is the chosen plan's, ``plans`` the ranking.

    Raises:
        VramplanError: a keyword that is not a FitRequest field, no GPU, bad ``gpus``/``strategy``/``offload``/
            ``global_batch``/``margin``, an unknown framework or technique.
    """
    req = call_request(FitRequest, model, "model", settings if gpu is None else {"gpu": gpu, **settings})
    ctx = _FitContext.prepare(req)
    rows = [_fit_method(ctx, name) for name in req.methods or default_methods()]
    return _report(ctx, rows)


@dataclass
class _FitContext:
    """What every method's row of one :func:`fit` shares: the request resolved once."""

    req: FitRequest
    spec: ModelSpec
    card: GPUSpec
    base: Any                      # the Parallel asked for
    parallels: list                # the layouts searched (every strategy on several GPUs without one)
    margin: float
    tokens: float | None
    framework: str
    techniques: tuple[str, ...]
    totals: Any                    # a DeviceTotals shared by every search

    @classmethod
    def prepare(cls, req: FitRequest) -> "_FitContext":
        """Resolve ``req`` against the catalogues; the checks that need the model, the card or the stack.

        Raises:
            VramplanError: no GPU, an unknown framework or technique, a batch the global batch does not
                divide, a batch/seq the model refuses, techniques that exclude each other.
        """
        from ..distributed import STRATEGIES, make_parallel
        from ..stacks import get_stack, parse_techniques
        from ..throughput import parse_count
        from .limits import DeviceTotals

        framework = get_stack(req.framework).name
        techs = parse_techniques(req.techniques)
        spec = get_model(req.model)
        card = resolve_gpu(req.gpu, req.gpu_mem)
        if card is None:
            raise VramplanError("fit needs a GPU", "pass --gpu NAME, --gpu auto or --gpu-mem 24GiB")
        base = make_parallel(req.gpus, req.strategy, req.offload)
        # several GPUs without a strategy: search the strategy too
        parallels = [make_parallel(base.gpus, s) for s in STRATEGIES] if base.gpus > 1 and req.strategy is None \
            else [base]
        margin = DEFAULT_MARGIN if req.margin is None else float(req.margin)
        n_tokens = parse_count(req.tokens, "--tokens")
        if req.batch is not None:
            if req.global_batch is not None:
                accum_for(req.global_batch, base.gpus, req.batch)
            make_config(spec, "lora", batch=req.batch, seq=req.seq)  # validates batch/seq
        if techs:
            make_config(spec, "lora", seq=req.seq, framework=framework, techniques=techs)  # technique rules
        return cls(req, spec, card, base, parallels, margin, n_tokens, framework, techs, DeviceTotals())

    def search_request(self, precision: str | None) -> SearchRequest:
        """The settings search of every method: the request's fixed settings, at ``precision``."""
        r = self.req
        return SearchRequest(seq=r.seq, precision=precision, global_batch=r.global_batch, parallels=self.parallels,
                             grad_ckpt=r.grad_ckpt, optimizer=r.optimizer, attn=r.attn, rank=r.rank, targets=r.targets,
                             margin=self.margin, tokens=self.tokens, epochs=r.epochs, totals=self.totals, batch=r.batch,
                             framework=self.framework, techniques=self.techniques, method_options=r.method_options)

    def method_card(self, method: str) -> GPUSpec:
        """The card a method's step has: the rest when a colocated engine (GRPO's vLLM) holds a share of it."""
        return _step_card(self.spec, self.card, method, self.req.seq, self.req.method_options)


def _fit_method(ctx: _FitContext, name: str) -> FitRow:
    """One method's row: its search, the plan shown, notes, technique advice and other setups."""
    from .limits import band_limits
    from .search import other_setups, search

    req, spec, card = ctx.req, ctx.spec, ctx.card
    sreq = ctx.search_request(check_card(req.precision, name, None, req.attn or DEFAULT_ATTENTION, card, ctx.framework))
    card_m = ctx.method_card(name)
    if card_m is not card:  # the step has part of the card: a colocated engine's share is judged on the whole
        sreq = sreq.with_(whole_card_bytes=card.memory_bytes)
    mp = search(spec, name, card_m, sreq)
    chosen = mp.best or _tight_choice(mp)
    cfg, par = chosen.config, chosen.parallel
    est = estimate_config(spec, cfg, card, parallel=par, tokens=ctx.tokens, epochs=req.epochs)
    notes, suggestions = _notes(ctx, name, sreq, mp, chosen, est)
    settings = {"grad_ckpt": cfg.grad_ckpt, "optimizer": cfg.optimizer, "precision": cfg.precision,
                "attn": cfg.attn, "batch": cfg.batch, "grad_accum": cfg.grad_accum, **chosen.settings}
    advice = _advice(ctx, name, card_m, sreq, mp, chosen, est) if req.advise else None
    alternatives = []
    if req.advise and mp.best is None and req.gpus == 1:
        # judged on the card the method's step has, as its search was (GRPO's colocated vLLM holds the rest)
        alternatives = other_setups(spec, name, card_m, sreq, current=chosen)
    return FitRow(method=cfg.method, requested=name, adapter=cfg.adapter, alternatives=alternatives,
                  fits=bool(est.fits), estimate=est,
                  **vars(band_limits(spec, cfg, card_m, par, totals=ctx.totals, margin=ctx.margin,
                                     searched=chosen._totals)),
                  limits=cfg.recipe.behaviour.limits(spec, cfg, card) if req.advise and req.methods else None,
                  settings=settings, notes=notes, plans=mp.plans, best=mp.best, chosen=chosen,
                  suggestions=suggestions, techniques=advice)


def _notes(ctx: _FitContext, name: str, sreq: SearchRequest, mp, chosen, est: Estimate) -> tuple[list[str], list]:
    """A row's notes (why nothing fits, or why the fallback; the MoE QLoRA note) and, when nothing is
    comfortable, what would fit (:func:`~vramplan.planner.search.what_would_fit`)."""
    from .search import fallback_note, what_would_fit

    notes: list[str] = []
    suggestions = []
    nothing_fits = False  # the "no" note already names the fallback it tried
    if mp.best is None:
        suggestions = what_would_fit(ctx.spec, name, ctx.card, sreq, gpus=ctx.base.gpus)
        note, verdict = _no_comfortable_note(mp, est, ctx.margin)
        notes.append(note)
        nothing_fits = verdict is Verdict.NO
        if suggestions:
            notes.append("with GC and 8-bit AdamW it would fit on " + "; ".join(x.text for x in suggestions))
    if chosen.fallback and not nothing_fits:
        notes.append(fallback_note(mp, chosen) or chosen.fallback)  # the plan shown (comfortable or tight) fell back
    unmet = [c.text for c in est.constraints if not c.met]  # beside the step (GRPO's colocated vLLM share)
    if unmet:
        notes.append("; ".join(unmet))
    moe_note = moe_qlora_note(ctx.spec, chosen.config, short=True)
    if moe_note:
        notes.append(moe_note)
    return notes, suggestions


def _no_comfortable_note(mp, est: Estimate, margin: float) -> tuple[str, Verdict]:
    """What a row without a comfortable plan says, and its verdict: nothing fits (no), or tight (fits
    without the margin, or over the card inside the band's lower end)."""
    from ..bands import band_for_estimate

    b = band_for_estimate(est)
    verdict = classify(est.peak_bytes, est.capacity_bytes, b.hi, b.lo)
    if verdict is Verdict.NO:
        fb = next((p.fallback for p in mp.plans if p.fallback), None)  # "QLoRA fallback", "QDoRA fallback"
        return ("no setting fits (tried GC, 8-bit/paged AdamW"
                + (f", {fb.removesuffix(' fallback')}" if fb else "") + ")"), verdict
    if est.fits:
        return (f"tight, try it: no setting is comfortable (the {margin:.0%} margin and the band's upper end "
                f"{100 * b.hi:+.0f}% under the card); shown: the fastest whose prediction fits"), verdict
    return (f"{LIKELY_OVER}: the least-memory setting is predicted {100 * (est.peak_bytes / est.capacity_bytes - 1):.1f}% "
            f"over the card; only the band's lower end ({100 * b.lo:+.0f}%) is under it: it probably does not fit as "
            "planned (run it only to find out, with expandable segments and nothing else on the card); what fits "
            "follows"), verdict


def _advice(ctx: _FitContext, name: str, card_m: GPUSpec, sreq: SearchRequest, mp, chosen, est: Estimate):
    """What each technique saves on the chosen plan; when nothing is comfortable and a set of techniques
    makes it so, the method's fastest plan with them on (it may drop GC, say) on ``card_m``, the card its step has
    (:meth:`_FitContext.method_card`)."""
    from .search import fastest_plan
    from .techniques import recommend_techniques

    advice = recommend_techniques(ctx.spec, chosen.config, ctx.card, parallel=chosen.parallel, margin=ctx.margin,
                                  base=est)
    if mp.best is None and advice.recommended and advice.fits:
        # the search's best with the techniques on, else its fastest plan within the card its step has
        advice.plan = fastest_plan(ctx.spec, name, card_m, sreq.with_(techniques=ctx.techniques + advice.techniques))
    return advice


def _report(ctx: _FitContext, rows: list[FitRow]) -> FitReport:
    """The :class:`FitReport` of ``rows``: the assumptions of the first row, the context note, the ranking rule."""
    from .. import validate as v

    req, spec = ctx.req, ctx.spec
    model = req.model
    resolved = None if isinstance(model, ModelSpec) or str(model).lower() == spec.name else f"{model} -> {spec.name}"
    assumptions = rows[0].estimate.assumptions[:4] if rows else []
    note = v.context_note(spec, req.seq)
    if note:
        assumptions.insert(0, note)
    tech_text = techniques_text(rows[0].estimate.config) if rows else None
    if tech_text:
        assumptions.append(tech_text)
    if rows:
        assumptions.append(f"ranking: tokens/s of plans whose per-GPU peak stays below {1 - ctx.margin:.0%} of the "
                           f"capacity; {next(a for a in rows[0].estimate.assumptions if a.startswith('throughput'))}")
    return FitReport(model=spec.name, model_resolved_from=resolved, gpu=ctx.card.name,
                     capacity_bytes=ctx.card.memory_bytes, seq=req.seq, rows=rows, assumptions=assumptions,
                     gpus=ctx.base.gpus, strategy=ctx.base.strategy if len(ctx.parallels) == 1 else None,
                     offload=ctx.base.offload, margin=ctx.margin, global_batch=req.global_batch, tokens=ctx.tokens,
                     epochs=req.epochs, top=int(req.top), framework=ctx.framework, techniques=ctx.techniques)


def _tight_choice(mp) -> "Plan":
    """The plan shown when none is comfortable: the fastest tight plan whose central prediction fits the card
    (own adapter first), else the least-memory plan (tight when the band's lower end fits the card, else "no")."""
    fitting = [p for p in mp.plans if p.peak_bytes <= p.capacity_bytes]
    if fitting:
        return max(fitting, key=lambda p: (p.fallback is None, p.tokens_per_s))
    return mp.smallest


# -- which card? -------------------------------------------------------------------------------

@dataclass
class CardRow:
    """One method on one catalogue card where it fits with the margin, with what it costs there.

    ``cost_per_mtok_usd``: the cloud price per hour over the tokens it trains in an hour (x 1e6);
    ``cost_usd``: GPU-hours x the price per hour when the dataset size (``tokens``) is known.
    """

    gpu: str
    capacity_bytes: int
    row: FitRow
    price: Price

    @property
    def tokens_per_s(self) -> float:
        return float(self.row.tokens_per_s or 0.0)

    @property
    def cost_per_mtok_usd(self) -> float | None:
        h = self.price.cloud_usd_per_hour
        return None if h is None or not self.tokens_per_s else h / (self.tokens_per_s * 3600.0) * 1e6

    @property
    def cost_usd(self) -> float | None:
        h = self.price.cloud_usd_per_hour
        return None if h is None or self.row.gpu_hours is None else h * float(self.row.gpu_hours)

    def to_json(self) -> dict:
        r = self.row
        return {"gpu": self.gpu, "capacity_bytes": self.capacity_bytes, "method": r.label, "recipe": r.recipe,
                "verdict": r.verdict.value, "peak_bytes": int(r.estimate.peak_bytes),
                "tokens_per_s": round(self.tokens_per_s, 1),
                "time_to_train_s": None if r.time_to_train_s is None else round(float(r.time_to_train_s), 1),
                "gpu_hours": None if r.gpu_hours is None else round(float(r.gpu_hours), 3),
                "settings": r.settings, "price": self.price.to_json(),
                "cost_per_mtok_usd": None if self.cost_per_mtok_usd is None else round(self.cost_per_mtok_usd, 4),
                "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 2)}


@dataclass
class CardsReport:
    """Every catalogue card on which a method fits: ``rows`` fastest first, ``by_cost`` cheapest first."""

    model: str
    seq: int
    methods: list[str]
    tokens: float | None
    epochs: float
    rows: list[CardRow]
    by_cost: list[CardRow]
    no_fit: list[str]              # cards on which no requested method fits with the margin
    assumptions: list[str]
    framework: str = "hf"

    def to_json(self) -> dict:
        from ..prices import sources

        return {"model": self.model, "seq": self.seq, "methods": self.methods, "tokens": self.tokens,
                "epochs": self.epochs, "framework": self.framework,
                "rows": [r.to_json() for r in self.rows], "by_cost": [f"{r.gpu}:{r.row.requested}" for r in self.by_cost],
                "no_fit": self.no_fit, "price_sources": sources(), "assumptions": self.assumptions}


def fit_cards(model: "str | ModelSpec | FitRequest | None" = None, *, cards=None, progress=None,
              **settings: Any) -> CardsReport:
    """"Which card?": :func:`fit` on every catalogue card, the plans that fit ranked by speed and by cost.

    For each card (``cards``: a list of names, default the whole catalogue) and each method, the
    fastest plan that fits with the margin (:func:`fit`'s search, without its technique advice) in what the step
    has of that card, with any constraint beside the step met (a colocated engine's weights in its share).
    ``rows`` ranks them by time to train (tokens/s when no ``tokens``), ``by_cost`` by the cloud
    cost to train (``vramplan/data/prices.json``: typical on-demand $/GPU-hour, each with its
    source and date; per million tokens when no ``tokens``); cards without a price come last.

    Args:
        model: a model, or a :class:`~vramplan.request.FitRequest` (its ``gpu`` is ignored).
        progress: ``(done, total, card)`` callback after each card (the CLI's progress bar).
        settings: :class:`~vramplan.request.FitRequest`'s fields (seq, methods, tokens, epochs, framework,
            precision, method_options, ...).

    Returns:
        :class:`CardsReport`.
    """
    from ..gpus import catalogue
    from ..prices import price_of

    req = call_request(FitRequest, model, "model", settings)
    if req.gpus != 1 or req.gpu_mem is not None:
        raise VramplanError("--gpu all ranks single catalogue cards", "drop --gpus/--gpu-mem, or name one card")
    names = list(cards) if cards else [g.name for g in sorted(catalogue().values(), key=lambda g: (g.memory_bytes, g.name))]
    spec = get_model(req.model)
    req = req.with_(model=spec, advise=False)
    rows: list[CardRow] = []
    no_fit: list[str] = []
    first = None
    for i, name in enumerate(names, 1):
        card = get_gpu(name)
        try:
            rep = fit(req, card)
        except CardUnsupportedError:
            rep = None  # the card cannot run the stack's precision or kernels
        first = first or rep
        # a comfortable plan whose needs beside the step are met too (GRPO's colocated vLLM loads in its share)
        fitting = [r for r in (rep.rows if rep else []) if r.best is not None and r.fits]
        if not fitting:
            no_fit.append(card.name)
        for r in fitting:
            rows.append(CardRow(gpu=card.name, capacity_bytes=card.memory_bytes, row=r, price=price_of(card.name)))
        if progress is not None:
            progress(i, len(names), card.name)
    rows.sort(key=lambda c: (-c.tokens_per_s, c.gpu))
    by_cost = sorted(rows, key=lambda c: (c.cost_per_mtok_usd is None, c.cost_per_mtok_usd or 0.0, -c.tokens_per_s))
    assumptions = list(first.assumptions) if first else []
    assumptions.append("cost: typical on-demand cloud price per GPU-hour x the predicted GPU-hours "
                       "(vramplan/data/prices.json, each price with its source and date); list prices are shown, "
                       "not used to rank")
    return CardsReport(model=spec.name, seq=int(req.seq), methods=list(req.methods or default_methods()),
                       tokens=first.tokens if first else None, epochs=float(req.epochs), rows=rows,
                       by_cost=by_cost, no_fit=no_fit, assumptions=assumptions,
                       framework=first.framework if first else req.framework)
