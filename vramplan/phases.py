"""The phases of one training step: typed terms in, per-phase bytes and the peak out.

:func:`combine_phases` is the one place for the phase arithmetic of
:func:`vramplan.memory.step_memory`, :func:`vramplan.memory.step_memory_rows` and the sharded
planner (:func:`vramplan.distributed.parallel_step_memory`). It takes three typed values:

* :class:`StepTerms` -- what depends on the micro-batch and the sequence (activations, logits,
  transient buffers, KV cache), from :func:`vramplan.memory.step_terms` and the method's
  ``step_terms`` hook;
* :class:`StateTerms` -- what depends only on the model state (optimiser states, autocast's
  weight casts, gradients and where in backward they appear), from
  :func:`vramplan.memory.state_terms`;
* :class:`Gathering` -- the sharded planner's extras (communication buckets, gathered units).

Units: bytes throughout. Every field may be a Python number or a numpy array (float64 for the
batch-dependent terms, whose values are whole numbers of bytes); arrays broadcast, so a grid of
micro-batches and sequences -- or a column of configurations stacked on a leading axis --
evaluates in one call. Numpy only.

Phases of a steady-state step (step >= 2: optimiser states exist, gradients were freed by
``zero_grad(set_to_none=True)``):

* load: the always-resident bytes (weights, quantisation state, adapters, master weights);
* rollout (methods that generate): + optimiser states + KV cache of the generated sequences;
* forward: + saved activations + the forward's logits/loss buffers (or a frozen copy's peak);
* backward: + max(saved activations + loss backward buffers, all gradients + one layer's
  backward transients), walked layer by layer (:func:`_backward_walk`);
* optimizer_step: + gradients + the optimiser's temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

from .taxonomy import RESIDENT_COMPONENTS, Component, Phase

PHASE_ORDER = (Phase.LOAD, Phase.ROLLOUT, Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP)

#: A count of bytes: an int, a float holding a whole number, or a numpy array of them.
Bytes = Any


@dataclass(frozen=True)
class StepTerms:
    """The batch-dependent terms of one step, in bytes (float64 arrays over the batch/sequence grid).

    Produced by :func:`vramplan.memory.step_terms` (then the method's ``Behaviour.step_terms``
    hook, which returns a changed copy: :func:`dataclasses.replace`), consumed by
    :func:`combine_phases` and the FSDP2 walk of :mod:`vramplan.distributed`.
    """

    acts: Bytes             #: saved activations alive when backward starts (incl. the shared attention mask)
    recompute: Bytes        #: a checkpointed layer's recomputed activations (0 without checkpointing)
    layer: Bytes            #: the saved tensors of the layer running backward
    layer_attn: Bytes       #: ... of its attention block only
    logits_fwd: Bytes       #: the logits and loss buffers at the forward's end
    logits_bwd: Bytes       #: the logits and loss buffers when backward starts
    transient: Bytes        #: one layer's backward buffers (gradients of its activations)
    nograd_peak: Bytes      #: the working set of frozen copies' no-grad forwards (a reference's)
    temps_fwd: Bytes        #: QLoRA's dequantised weight, in forward and backward
    temps_fwd_only: Bytes   #: DoRA's weight-norm buffers in forward
    temps_recompute: Bytes  #: the same in a checkpointed layer's recomputation
    kv: Bytes               #: the rollout's KV cache (methods that generate)
    rollout_logits: Bytes   #: what the rollout holds beside its KV cache at its peak
    attn_fwd: Bytes         #: eager attention's forward working set above the layer's saved tensors
    attn_bwd: Bytes         #: eager attention's backward working set (its softmax's buffers)
    logits_kept: Bytes      #: logits a step keeps through its whole backward (TRL PPO's entropy)
    dora_prefix: Bytes      #: what a recomputed layer has saved when DoRA builds its weight norm
    last_graph: Bytes       #: the previous step's graph kept into this forward (stacks.toml keeps_last_graph)
    zeros: Bytes            #: zeros of the grid's shape (broadcasting helper)
    #: the final norm's and the head's saved tensors (in ``acts``), freed by their backward before any layer's
    #: (and, without checkpointing, the shared attention mask: nothing saves it for backward)
    head_acts: Bytes = 0.0
    #: the part of ``transient`` beside a dequantised 4-bit weight (:func:`vramplan.activations.linear_backward_transient`)
    transient_linear: Bytes = 0.0

    @classmethod
    def empty(cls, zeros: np.ndarray) -> "StepTerms":
        """Every term zero on the grid of ``zeros``."""
        return cls(**{f.name: zeros for f in fields(cls)})

    def broadcast(self, shape: tuple[int, ...]) -> "StepTerms":
        """Every term broadcast to ``shape`` (new arrays where a term was smaller; the terms already of that shape
        as they are, and these terms themselves when every one is: they are immutable)."""
        terms = self.__dict__
        out = None
        for name in TERM_NAMES:
            v = terms[name]
            if (v.shape if type(v) is np.ndarray else np.shape(v)) != shape:
                if out is None:
                    out = dict(terms)
                out[name] = filled(v, shape)
        return self if out is None else StepTerms(**out)

    @staticmethod
    def stack(rows: list["StepTerms"]) -> "StepTerms":
        """One :class:`StepTerms` whose arrays gain a leading axis, one row per element of ``rows``.

        Each row's terms have one shape (:meth:`broadcast`): ``np.array`` of them is ``np.stack`` of them, in a
        third of its time."""
        return StepTerms(**{name: np.array([getattr(r, name) for r in rows]) for name in TERM_NAMES})

    def rank_rows(self, n: int, shape: tuple[int, ...]) -> list["StepTerms"]:
        """The ``n`` rows of terms with a leading rank axis (:func:`vramplan.memory.step_terms`' ``ranks``), each
        :meth:`broadcast` to ``shape`` (the grid's): a term with that axis (one dimension more than the grid) is filled
        to ``(n, *shape)`` and row ``i`` takes its element ``i``; a term without it (it does not read the rank) is
        every row's, broadcast once. The same values and dtypes as each rank's own terms broadcast."""
        axis, terms = (n,) + shape, self.__dict__
        cols = []  # each term's n rows, in field order (each row's terms are built positionally)
        for name in TERM_NAMES:
            v = terms[name]
            if type(v) is np.ndarray and v.ndim == len(axis):  # (a term that reads the rank: an array)
                cols.append(list(v if v.shape == axis else filled(v, axis)))  # its rows: views along the axis
            else:
                cols.append((v if np.shape(v) == shape else filled(v, shape),) * n)
        return [StepTerms(*row) for row in zip(*cols)]

    def take(self, rows: np.ndarray) -> "StepTerms":
        """The terms of a :meth:`stack` at ``rows`` (an index array along its leading axis: the stack of those rows)."""
        return StepTerms(**{name: getattr(self, name)[rows] for name in TERM_NAMES})

    def with_(self, **changes: Bytes) -> "StepTerms":
        """A copy with ``changes`` (a method's hook adjusting some terms)."""
        return replace(self, **changes)


def filled(value: Bytes, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` broadcast to ``shape`` as a new array: ``np.broadcast_to``'s values and dtype (and its error when
    the shapes do not broadcast), without building a read-only view (ten times faster on a search's small grids)."""
    a = np.asarray(value)
    if a.ndim > len(shape):  # assignment would drop leading 1s; broadcast_to refuses
        raise ValueError(f"cannot broadcast an array of shape {a.shape} to {shape}")
    out = np.empty(shape, a.dtype)
    out[...] = a
    return out


#: :class:`StepTerms`' field names, in order.
TERM_NAMES = tuple(f.name for f in fields(StepTerms))


@dataclass(frozen=True)
class BackwardCasts:
    """Autocast's weight casts as backward sees them, in bytes (:func:`vramplan.memory.backward_casts`)."""

    cache_bwd: Bytes        #: casts still saved for backward when it starts (all, or only the heads' under checkpointing)
    recompute_cache: Bytes  #: the casts a recomputed layer makes again
    layer_cache: Bytes      #: the casts of the layer running backward (alive until it is done)
    attn_cache: Bytes       #: ... of its attention block
    head_cache: Bytes       #: the output heads' casts, freed once the loss's backward is through the heads


@dataclass(frozen=True)
class StateTerms:
    """The batch-independent terms of a step, in bytes (scalars, or columns of a stack of configurations).

    From :func:`vramplan.memory.state_terms` (one device) or the sharded state
    (:func:`vramplan.distributed.parallel_step_memory`).
    """

    states: Bytes           #: optimiser states
    cache: Bytes            #: autocast's weight casts during forward (alive until the autocast context exits)
    casts: BackwardCasts    #: the casts as backward sees them
    grads_bwd: Bytes        #: gradients alive at the end of backward
    grads_opt: Bytes        #: gradients alive during the optimiser step
    step_temporary: Bytes   #: the optimiser step's temporaries
    rollout_on: bool        #: the method generates (a rollout phase exists)
    grads_tail: Bytes = 0   #: the part of ``grads_bwd`` made by the first layer and the embedding, after the last layer's work
    grads_end_extra: Bytes = 0  #: buffers of the last gradient accumulation, beside every gradient (tied embeddings)
    layer_grad: Bytes = 0   #: the gradients of the first layer's MLP block (made before its attention's)
    head_grad: Bytes = 0    #: gradients made before any layer's backward (the output head and final norm)
    #: the 16-bit gradient of the trained head weight's autocast cast, alive beside its fp32 cast (``head_grad``)
    head_grad_cast: Bytes = 0
    grads_held: Bytes = 0   #: gradients alive when the forward starts (gradient accumulation's running sums)


@dataclass(frozen=True)
class Gathering:
    """The sharded planner's extras, in bytes; the defaults describe one device.

    ``gathered`` (unsharded units in forward and backward) is the default of every point an
    engine that gathers differently through the step names: ``fwd_mid`` (a layer's forward before
    the logits, beside the activations but one layer's; None: no such point), ``bwd_start``
    (beside everything saved and the logits' gradients), ``bwd_work`` (inside a layer's
    backward), ``bwd_end`` (beside every gradient).
    """

    comm: Bytes = 0                 #: communication buckets, every phase
    gathered: Bytes = 0             #: unsharded units in forward and backward
    rollout_gather: Bytes = 0       #: the policy gathered for generation
    fwd_mid: Bytes | None = None
    bwd_start: Bytes | None = None
    bwd_work: Bytes | None = None
    bwd_end: Bytes | None = None
    comm_component: Component | None = None      #: reported under (default: gradients)
    gathered_component: Component | None = None  #: reported under (default: weights)

    def at(self, point: Bytes | None) -> Bytes:
        """The bytes gathered at a point of the step (``gathered`` where the engine names none)."""
        return self.gathered if point is None else point


ONE_DEVICE = Gathering()


@dataclass(frozen=True)
class _Resident:
    """The batch-independent terms on the grid: resident bytes, states, casts and held gradients."""

    static: np.ndarray
    states: np.ndarray
    cache: np.ndarray
    cache_bwd: np.ndarray
    held: np.ndarray


def _resident(t: StepTerms, base: dict[Component, int], s: StateTerms, g: Gathering) -> _Resident:
    zeros = t.zeros
    static = sum(base.get(c, 0) for c in RESIDENT_COMPONENTS) + zeros + g.comm
    return _Resident(static=static, states=s.states + zeros, cache=s.cache + zeros,
                     cache_bwd=s.casts.cache_bwd + zeros, held=s.grads_held + zeros)


@dataclass(frozen=True)
class _Forward:
    """The forward's candidates (bytes above the resident state, states, casts and held gradients)."""

    temps: np.ndarray   #: the larger of QLoRA's dequantised weight and DoRA's forward buffers (less what overlaps)
    work: np.ndarray    #: saved activations + the largest working set at the forward's end
    peak: np.ndarray    #: the larger of ``work`` and a frozen copy's forward, with the gathered units
    mid: np.ndarray     #: a layer's forward before the logits (engines that name that point; else 0)
    head_f: Bytes = 0.0  #: the heads' autocast casts, made by the head's matmul after every layer's forward


def _forward_walk(t: StepTerms, g: Gathering, head_f: Bytes = 0.0) -> _Forward:
    """The forward's peak: everything saved plus the largest of the logits and loss buffers, QLoRA's
    dequantised weight or DoRA's norm buffers, and eager attention's scores; or a frozen copy's
    no-grad forward. DoRA's norm buffers come in the last layer's forward beside what that layer has
    saved so far (without checkpointing ``acts`` holds the whole layer; the prefix is what exists by then);
    QLoRA's dequantised weight lives inside one layer's forward/backward, never beside the loss."""
    ckpt = t.recompute > 0
    dora_side = np.where(ckpt, 0, np.maximum(t.layer - t.dora_prefix, 0))
    temps = np.maximum(t.temps_fwd, t.temps_fwd_only - dora_side)
    # a layer's buffers (the dequantised weight, eager attention's scores) come before the heads' autocast casts
    # exist (``head_f``, made by the head's matmul after every layer): beside the cache less those
    work = t.acts + t.last_graph + np.maximum(t.logits_fwd, np.maximum(temps, t.attn_fwd) - head_f)
    peak = g.gathered + np.maximum(work, t.nograd_peak)
    mid = t.zeros if g.fwd_mid is None else np.maximum(t.acts - t.layer, 0) + g.fwd_mid
    return _Forward(temps=temps, work=work, peak=peak, mid=mid, head_f=head_f)


@dataclass(frozen=True)
class _Backward:
    """The backward's candidates, each in bytes above the resident state and the optimiser states."""

    grads_before: np.ndarray  #: gradients made before the first layer's attention block
    saved_side: np.ndarray    #: a layer's backward, early: everything saved (and its recomputation)
    grads_side: np.ndarray    #: late: the first layer beside every gradient but its attention's and the embedding's
    layer_temps: np.ndarray   #: one layer's backward buffers and its dequantised weight
    mlp_work: np.ndarray      #: the layer branch at its MLP block
    rec_prefix: np.ndarray    #: what a recomputed layer has saved when DoRA builds its norm
    rec_saved: np.ndarray
    rec_grads: np.ndarray
    rec_work: np.ndarray      #: DoRA's norm in a checkpointed layer's recomputation
    attn_side_cache: np.ndarray
    saved_attn: np.ndarray
    grads_attn: np.ndarray
    attn_work: np.ndarray     #: eager attention's softmax backward, after the layer's MLP
    work: np.ndarray          #: the layer branch's peak (with the units gathered inside a layer)
    acts_end: np.ndarray      #: backward's start: the larger of ``logits_end`` and ``head_end``
    logits_end: np.ndarray    #: everything saved plus the loss's gradients
    head_end: np.ndarray      #: everything saved plus the head weight's gradient and its fp32 cast (0: no cast)
    grads_end: np.ndarray     #: the larger of ``work`` and backward's end (every gradient), + logits kept


def _backward_walk(t: StepTerms, s: StateTerms, g: Gathering, r: _Resident) -> _Backward:
    """Backward starts with everything saved plus the loss's gradients; then, layer by layer, saved
    tensors and casts are freed while gradients accumulate: a layer's backward sees the larger of the
    two ends, plus its recomputation (checkpointing), its transient buffers and its dequantised weight."""
    c = s.casts
    grads_before = np.maximum(s.grads_bwd - s.grads_tail, 0)
    # a layer's backward works beside either end: early, every saved tensor (plus its recomputation);
    # late, the first layer beside every gradient but its attention block's and the embedding's
    # (the final norm's and the head's saved tensors were freed by their backward, before any layer's)
    saved_side = (t.acts - t.head_acts + np.maximum(r.cache_bwd - c.head_cache, 0) + t.recompute
                  + c.recompute_cache + r.held)
    # the first layer's MLP backward (all its saved tensors and casts), then its attention's
    grads_side = np.maximum(np.maximum(grads_before - s.layer_grad, 0) + t.layer + c.layer_cache,
                            grads_before + t.layer_attn + c.attn_cache)
    # (a dequantised weight is beside only part of the layer's buffers: activations.linear_backward_transient)
    layer_temps = np.maximum(t.transient, t.temps_fwd + t.transient_linear)
    mlp_work = np.maximum(saved_side, grads_side) + layer_temps
    # DoRA's weight-norm buffers in a checkpointed layer's recomputation: beside what the layer has
    # saved again before its largest adapted module runs (``rec_prefix``), not the whole layer
    rec_prefix = np.minimum(t.dora_prefix, t.recompute)
    rec_saved = saved_side - t.recompute + rec_prefix
    rec_grads = grads_before + rec_prefix
    rec_work = np.maximum(rec_saved, rec_grads) + t.temps_recompute
    # eager attention's backward peak (its softmax's buffers) comes after the layer's MLP is done: the
    # layer's attention-block tensors (less what matmul's backward freed) plus those buffers
    # (the last layer's attention runs backward after the head's and its MLP's gradients exist)
    # (and its MLP's weight casts are released with that block's saved tensors)
    attn_side_cache = np.maximum(r.cache_bwd - c.head_cache, 0) + c.recompute_cache - (c.layer_cache - c.attn_cache)
    saved_attn = (saved_side - t.layer + t.layer_attn + s.head_grad + s.layer_grad
                  - (c.layer_cache - c.attn_cache))
    grads_attn = grads_before + t.layer_attn + c.attn_cache
    attn_work = np.maximum(saved_attn, grads_attn) + t.attn_bwd
    work = np.maximum(np.maximum(mlp_work, attn_work), rec_work)
    logits_end = t.acts + r.cache_bwd + r.held + t.logits_bwd + g.at(g.bwd_start)
    # the trained head's matmul backward (before any layer's, every activation still saved; the logits'
    # gradient freed once it ran): the 16-bit gradient of its weight's autocast cast beside the fp32 cast
    # autograd makes of it (the dry run: qwen2.5-7b GRPO full, eager, 2k, peaks there)
    # (the head's own cast, saved by that matmul, freed with it)
    head_end = np.where(s.head_grad_cast > 0, t.acts + np.maximum(r.cache_bwd - c.head_cache, 0) + r.held
                        + s.head_grad + s.head_grad_cast
                        + t.logits_kept + g.at(g.bwd_start), 0)
    acts_end = np.maximum(logits_end, head_end)
    work = work + g.at(g.bwd_work)
    grads_end = np.maximum(work, s.grads_bwd + s.grads_end_extra + g.at(g.bwd_end)) + t.logits_kept
    return _Backward(grads_before=grads_before, saved_side=saved_side, grads_side=grads_side, layer_temps=layer_temps,
                     mlp_work=mlp_work, rec_prefix=rec_prefix, rec_saved=rec_saved, rec_grads=rec_grads,
                     rec_work=rec_work, attn_side_cache=attn_side_cache, saved_attn=saved_attn, grads_attn=grads_attn,
                     attn_work=attn_work, work=work, acts_end=acts_end, logits_end=logits_end, head_end=head_end,
                     grads_end=grads_end)


def combine_phases(t: StepTerms, base: dict[Component, int], s: StateTerms, g: Gathering = ONE_DEVICE,
                   components: "bool | frozenset[Component]" = True):
    """The phases of a step from its terms, the peak phase, and the components at the peak.

    ``t``: the batch-dependent terms (:func:`vramplan.memory.step_terms`); ``base``: the
    always-resident bytes by component (weights, quantisation state, adapters, master weights);
    ``s``: the batch-independent terms (:func:`vramplan.memory.state_terms`); ``g``: the sharded
    planner's extras (default: one device); ``components=False`` skips the per-component
    breakdown (a search only needs the peak), a set of components works out only those (each equal to
    its value in the whole breakdown, in the same order: what a caller reads, e.g. the device chain's). With gradient accumulation ``s.grads_held`` are the
    earlier micro-batches' sums, kept through this micro-batch's forward and backward (autograd's
    AccumulateGrad adds each new gradient into them in place).

    Returns ``(phases, peak, peak_phase_index, components)``: bytes per :class:`Phase`, their
    maximum, its index into :data:`PHASE_ORDER`, and bytes per :class:`Component` at the peak.
    """
    r = _resident(t, base, s, g)
    fw = _forward_walk(t, g, np.minimum(s.casts.head_cache, r.cache))
    bw = _backward_walk(t, s, g, r)
    phases = {Phase.LOAD: r.static.copy(),
              Phase.ROLLOUT: (r.static + r.states + t.kv + t.rollout_logits + g.rollout_gather
                              if s.rollout_on else t.zeros.copy()),
              Phase.FORWARD: r.static + r.states + r.cache + r.held + np.maximum(fw.peak, fw.mid),
              Phase.BACKWARD: r.static + r.states + np.maximum(bw.acts_end, bw.grads_end),
              Phase.OPTIMIZER_STEP: r.static + r.states + s.grads_opt + s.step_temporary}
    stack = np.array([phases[p] for p in PHASE_ORDER])  # one shape each: np.stack's result, faster
    idx = np.argmax(stack, axis=0)
    peak = np.max(stack, axis=0)
    if components is False:
        return phases, peak, idx, {}
    want = None if components is True else frozenset(components)
    return phases, peak, idx, _components_at_peak(t, base, s, g, r, fw, bw, idx, want)


def _at_peak(idx: np.ndarray, zeros: np.ndarray, by_phase: dict[Phase, Bytes]) -> np.ndarray:
    """Where the peak is phase p, ``by_phase[p]`` (0 for a phase not given: the zeros it starts from, which no
    other phase's ``np.where`` touches there, so a phase not given is skipped)."""
    out = zeros.copy()
    for k, p in enumerate(PHASE_ORDER):
        v = by_phase.get(p)
        if v is not None:
            out = np.where(idx == k, v, out)
    return out


@dataclass(frozen=True)
class _Where:
    """Which branch of each phase holds the peak (boolean arrays over the grid)."""

    bwd_act: np.ndarray    #: backward peaks at its start (everything saved + the loss's gradients)
    bwd_head: np.ndarray   #: ... at the head's weight gradient and its fp32 cast (else the loss's gradients)
    layer: np.ndarray      #: ... inside a layer's backward
    in_rec: np.ndarray     #: the layer's peak is DoRA's norm in its recomputation
    in_attn: np.ndarray    #: the layer's peak is eager attention's softmax backward
    bwd_saved: np.ndarray  #: in the layer branch: the saved end (else the gradient end)
    fwd_act: np.ndarray    #: forward peaks in the trained copies' forward (else a frozen copy's)
    fwd_at_mid: np.ndarray  #: forward peaks inside a layer (engines that name that point)
    fwd_temps: np.ndarray  #: forward's working set is QLoRA's/DoRA's temporaries (not the logits)
    fwd_attn: np.ndarray   #: forward's working set is eager attention's scores


def _where(t: StepTerms, s: StateTerms, g: Gathering, fw: _Forward, bw: _Backward) -> _Where:
    bwd_act = bw.acts_end >= bw.grads_end
    in_rec = bw.rec_work > np.maximum(bw.mlp_work, bw.attn_work)
    in_attn = ~in_rec & (bw.attn_work > bw.mlp_work)
    bwd_saved = np.where(in_rec, bw.rec_saved >= bw.rec_grads,
                         np.where(in_attn, bw.saved_attn >= bw.grads_attn, bw.saved_side >= bw.grads_side))
    bwd_end = s.grads_bwd + s.grads_end_extra + g.at(g.bwd_end) >= bw.work  # backward's last state: all gradients
    return _Where(bwd_act=bwd_act, bwd_head=bw.head_end > bw.logits_end, layer=~bwd_act & ~bwd_end, in_rec=in_rec, in_attn=in_attn, bwd_saved=bwd_saved,
                  fwd_act=fw.work >= t.nograd_peak, fwd_at_mid=fw.mid > fw.peak, fwd_temps=t.logits_fwd < fw.temps - fw.head_f,
                  fwd_attn=t.attn_fwd - fw.head_f > np.maximum(t.logits_fwd, fw.temps - fw.head_f))


def _components_at_peak(t: StepTerms, base: dict[Component, int], s: StateTerms, g: Gathering, r: _Resident,
                        fw: _Forward, bw: _Backward, idx: np.ndarray,
                        want: frozenset | None = None) -> dict[Component, np.ndarray]:
    """Bytes per component at each grid point's peak phase, following the branch that holds the peak.

    ``want``: only these components (None: all); each is what the whole breakdown has for it, in its order."""
    zeros, c, w = t.zeros, s.casts, _where(t, s, g, fw, bw)

    def at(by_phase: dict[Phase, Bytes]) -> np.ndarray:
        return _at_peak(idx, zeros, by_phase)

    def need(k: Component) -> bool:
        return want is None or k in want

    comps: dict[Component, np.ndarray] = {k: base.get(k, 0) + zeros
                                          for k in (Component.QUANT_STATE, Component.ADAPTERS, Component.MASTER_WEIGHTS)}
    g_comp = g.gathered_component or Component.WEIGHTS
    comps[Component.WEIGHTS] = base.get(Component.WEIGHTS, 0) + zeros
    if need(g_comp):
        comps[g_comp] = comps.get(g_comp, zeros) + _gathered_at_peak(g, w, zeros, at)
    comps[Component.OPTIMIZER_STATES] = at({p: r.states for p in PHASE_ORDER if p is not Phase.LOAD})
    if need(Component.AUTOCAST_CACHE):
        comps[Component.AUTOCAST_CACHE] = _autocast_at_peak(c, r, fw, bw, w, at)
    c_comp = g.comm_component or Component.GRADIENTS
    if need(c_comp) or need(Component.GRADIENTS):
        comps[c_comp] = comps.get(c_comp, zeros) + g.comm
    if need(Component.GRADIENTS):
        comps[Component.GRADIENTS] = comps.get(Component.GRADIENTS, zeros) + _gradients_by_phase(s, r, bw, w, zeros, at)
    if need(Component.ACTIVATIONS):
        comps[Component.ACTIVATIONS] = at(_activations_by_phase(t, fw, bw, w))
    if need(Component.LOGITS):
        comps[Component.LOGITS] = at({Phase.FORWARD: np.where(w.fwd_act & ~w.fwd_temps & ~w.fwd_attn & ~w.fwd_at_mid,
                                                              t.logits_fwd, 0),
                                      # (the head weight's 16-bit gradient: made in the head's section, as the dry run tags it)
                                      Phase.BACKWARD: np.where(w.bwd_act, np.where(w.bwd_head, s.head_grad_cast + t.logits_kept,
                                                                                   t.logits_bwd), t.logits_kept),
                                      Phase.ROLLOUT: t.rollout_logits})
    if need(Component.TEMPORARIES):
        comps[Component.TEMPORARIES] = _temporaries_at_peak(t, s, fw, bw, w, zeros, at)
    comps[Component.KV_CACHE] = at({Phase.ROLLOUT: t.kv})
    return comps if want is None else {k: v for k, v in comps.items() if k in want}


def _gathered_at_peak(g: Gathering, w: "_Where", zeros: np.ndarray, at) -> np.ndarray:
    """The sharded planner's gathered parameters at the peak (zero on one device)."""
    return at({Phase.FORWARD: np.where(w.fwd_at_mid, 0 if g.fwd_mid is None else g.fwd_mid, g.gathered) + zeros,
               Phase.BACKWARD: np.where(w.bwd_act, g.at(g.bwd_start),
                                        np.where(w.layer, g.at(g.bwd_work), g.at(g.bwd_end))) + zeros,
               Phase.ROLLOUT: g.rollout_gather + zeros})


def _autocast_at_peak(c: BackwardCasts, r: "_Resident", fw: "_Forward", bw: "_Backward", w: "_Where",
                      at) -> np.ndarray:
    """Autocast's weight casts alive at the peak, by the branch that holds it."""
    head_saved = np.maximum(r.cache_bwd - c.head_cache, 0)
    return at({
        Phase.FORWARD: np.where(w.fwd_act & ~w.fwd_at_mid & (w.fwd_temps | w.fwd_attn), r.cache - fw.head_f, r.cache),
        Phase.BACKWARD: np.where(w.bwd_act, np.where(w.bwd_head, head_saved, r.cache_bwd), np.where(
            w.layer, np.where(w.bwd_saved, np.where(w.in_attn, bw.attn_side_cache, head_saved + c.recompute_cache),
                              np.where(w.in_rec, 0, np.where(w.in_attn, c.attn_cache, c.layer_cache))), 0))})


def _gradients_by_phase(s: StateTerms, r: "_Resident", bw: "_Backward", w: "_Where", zeros: np.ndarray,
                        at) -> np.ndarray:
    """Gradients alive at the peak (held sums, the layer's, all at backward's end), by the branch that holds it."""
    return at({
        Phase.FORWARD: r.held,
        Phase.BACKWARD: np.where(w.bwd_act, r.held + np.where(w.bwd_head, s.head_grad, 0), np.where(w.layer, np.where(
            w.bwd_saved, np.where(w.in_attn, s.head_grad + s.layer_grad, 0) + r.held, bw.grads_before), s.grads_bwd)),
        Phase.OPTIMIZER_STEP: s.grads_opt + zeros})


def _temporaries_at_peak(t: StepTerms, s: StateTerms, fw: "_Forward", bw: "_Backward", w: "_Where",
                         zeros: np.ndarray, at) -> np.ndarray:
    """Temporaries at the peak (QLoRA/DoRA buffers, eager attention's working sets, the optimiser's)."""
    return at({
        Phase.FORWARD: np.where(w.fwd_at_mid, 0, np.where(w.fwd_act & w.fwd_attn, t.attn_fwd,
                                                          np.where(w.fwd_act & w.fwd_temps, fw.temps, 0))),
        Phase.BACKWARD: np.where(w.layer, np.where(w.in_rec, t.temps_recompute,
                                                   np.where(w.in_attn, t.attn_bwd, bw.layer_temps)),
                                 np.where(w.bwd_act, 0, s.grads_end_extra)),
        Phase.OPTIMIZER_STEP: s.step_temporary + zeros})


def _activations_by_phase(t: StepTerms, fw: _Forward, bw: _Backward, w: _Where) -> dict[Phase, np.ndarray]:
    """Saved activations at the forward's and the backward's peak, by the branch that holds it."""
    forward = np.where(w.fwd_at_mid, np.maximum(t.acts - t.layer, 0),
                       np.where(w.fwd_act, t.acts + t.last_graph, t.nograd_peak))
    in_layer_saved = t.acts + np.where(w.in_rec, bw.rec_prefix,
                                       np.where(w.in_attn, t.recompute - t.layer + t.layer_attn, t.recompute))
    in_layer_grads = np.where(w.in_rec, bw.rec_prefix, np.where(w.in_attn, t.layer_attn, t.layer))
    backward = np.where(w.bwd_act, t.acts, np.where(w.layer, np.where(w.bwd_saved, in_layer_saved, in_layer_grads), 0))
    return {Phase.FORWARD: forward, Phase.BACKWARD: backward}
