"""Tensor accounting of live storages: a ``TorchDispatchMode`` plus the runtime's attribution hooks.

Every op's outputs pass through :class:`_Mode`; each *untyped storage* on the tracked
device is counted once, by ``nbytes()``, from the op that allocated it until its last
reference dies (a weakref callback on the storage object, which torch keeps alive exactly
as long as the storage: PyObject preservation). Views, in-place ops and ``out=`` ops share
storage and cost nothing; a storage resized in place is re-measured.

Attribution is *lifetime-final*: a storage gets one :class:`~vramplan.taxonomy.Component`
for its whole life, decided by, in order,

1. an explicit tag from the runtime (parameters, quantisation state, adapters, gradients,
   optimiser states, autocast's cached weight casts, the KV cache and generated scores);
2. the section it was allocated in (``LOGITS``: the output head, the loss and their
   gradients);
3. allocated during a forward (or a checkpoint recomputation) and still alive when that
   forward (recomputation) ended: ``ACTIVATIONS`` -- saved for backward, or kept as a
   checkpoint input;
4. else ``TEMPORARIES``.

Peaks are recorded as event indices (every allocation and free is an event), so the
breakdown at any peak is recomputed exactly afterwards from the allocation records: the
storages live at event ``T`` are those with ``alloc <= T < free``.

Kernel workspaces that CUDA kernels allocate internally but ``meta`` kernels do not
(FlashAttention-2 backward's fp32 ``dq_accum`` and ``softmax_d`` plus the expanded dK/dV of
grouped-query attention, memory-efficient attention backward's ``delta``, bitsandbytes'
dequantised weight in ``gemm_4bit``, CUDA embedding backward's per-segment fp32 partial
sums) are added as transient allocations (``TEMPORARIES``) right after the op's outputs.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

from ..runtime.hooks import StepHooks
from ..taxonomy import Component, Phase

ALLOC_ROUND = 512  # CUDA caching allocator rounds every request up to 512 B (c10/cuda/CUDACachingAllocator.cpp)


def _round(n: int) -> int:
    return -(-n // ALLOC_ROUND) * ALLOC_ROUND if n else 0


class Record:
    """One storage's life."""

    __slots__ = ("nbytes", "alloc", "free", "tag", "scope", "phase", "fwd", "rec", "op", "layer", "where", "wref")

    def __init__(self, nbytes: int, alloc: int, op: str):
        self.nbytes = nbytes
        self.alloc = alloc
        self.free: int | None = None
        self.tag: Component | None = None
        self.scope: Component | None = None
        self.phase: Phase | None = None
        self.fwd: int | None = None  # index of the forward it was allocated in
        self.rec: int | None = None  # index of the checkpoint recomputation it was allocated in
        self.op = op
        self.layer: int | None = None
        self.where: str | None = None  # module path inside the sampled layer
        self.wref = None

    def alive_at(self, t: int) -> bool:
        return self.alloc <= t and (self.free is None or self.free > t)


@dataclass
class Peak:
    bytes: int = -1
    at: int = 0


_OPNAMES: dict = {}


class _Mode(TorchDispatchMode):
    def __init__(self, tracker: "Tracker"):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tr = self.tracker
        op = _OPNAMES.get(func)
        if op is None:
            op = _OPNAMES[func] = getattr(getattr(func, "_schema", None), "name", None) or str(func)
        if isinstance(out, torch.Tensor):
            tr._track(out, op)
        elif isinstance(out, (tuple, list)):
            for o in out:
                if isinstance(o, torch.Tensor):
                    tr._track(o, op)
                elif isinstance(o, (tuple, list)):
                    for oo in o:
                        if isinstance(oo, torch.Tensor):
                            tr._track(oo, op)
        ws = tr.workspace(func, op, args, kwargs, out)
        if ws:
            tr._transient(ws, op + ":workspace")
        return out


class Tracker(StepHooks):
    """Live-storage accounting on one device type, and the runtime's attribution hooks.

    Use as ``with tracker.mode: ...``; ``start_measure()`` resets the peaks (the measured
    step), :meth:`breakdown` gives the components live at an event.
    """

    def __init__(self, device_type: str = "meta", *, workspaces: bool = True):
        self.device_type = device_type
        self.emulate_workspaces = workspaces
        self.mode = _Mode(self)
        self.live: dict[int, Record] = {}
        self.records: list[Record] = []
        self.seq = 0
        self.live_bytes = 0
        self.live_rounded = 0
        self.measuring = False
        self.cur_phase: Phase | None = None
        self.peak = Peak()
        self.peak_rounded = 0
        self.phase_peaks: dict[Phase, Peak] = {}
        self.fwd_index: int | None = None
        self.fwd_ends: list[int] = []
        self.rec_index: int | None = None
        self.rec_ends: list[int] = []
        self._rec_end_pending: int | None = None
        self.scopes: list[Component] = []
        self.layer: int | None = None
        self.sample_layer: int | None = None
        self.where: list[str] = []  # stack of module paths (relative to the sampled layer)
        self.layer_of: dict[int, int] = {}  # id(decoder layer module) -> index
        self.first_measured_fwd: int | None = None
        self.first_measured_rec: int | None = None
        self.transients: dict[str, int] = {}

    # -- accounting --------------------------------------------------------------------------
    def _track(self, x: torch.Tensor, op: str) -> Record | None:
        if x.device.type != self.device_type:
            return None
        if is_traceable_wrapper_subclass(x):  # torchao's NF4Tensor: its plain inner tensors hold the bytes
            rec = None
            for name in x.__tensor_flatten__()[0]:
                inner = getattr(x, name)
                if isinstance(inner, torch.Tensor):  # DTensor also flattens non-tensor attributes
                    rec = self._track(inner, op) or rec
            return rec
        st = x.untyped_storage()
        key = st._cdata
        rec = self.live.get(key)
        n = st.nbytes()
        if rec is None:
            rec = self._alloc(n, op)
            rec.wref = weakref.ref(st, functools.partial(self._on_free, key))
            self.live[key] = rec
        elif rec.nbytes != n:  # resized in place
            self.live_bytes += n - rec.nbytes
            self.live_rounded += _round(n) - _round(rec.nbytes)
            rec.nbytes = n
            self._update_peaks()
        return rec

    def _alloc(self, n: int, op: str) -> Record:
        if self._rec_end_pending is not None:
            self.rec_ends[self._rec_end_pending] = self.seq
            self._rec_end_pending = None
        self.seq += 1
        rec = Record(n, self.seq, op)
        rec.phase = self.cur_phase
        rec.fwd = self.fwd_index
        rec.rec = self.rec_index
        if self.scopes:
            rec.scope = self.scopes[-1]
        if self.layer is not None:
            rec.layer = self.layer
            if self.layer == self.sample_layer:
                rec.where = self.where[-1] if self.where else None
        self.records.append(rec)
        self.live_bytes += n
        self.live_rounded += _round(n)
        self._update_peaks()
        return rec

    def _on_free(self, key: int, _wref) -> None:
        rec = self.live.pop(key, None)
        if rec is None:
            return
        self.seq += 1
        rec.free = self.seq
        self.live_bytes -= rec.nbytes
        self.live_rounded -= _round(rec.nbytes)

    def _transient(self, n: int, label: str) -> None:
        """A kernel-internal allocation that lives only during the op."""
        rec = self._alloc(n, label)
        rec.tag = Component.TEMPORARIES
        self.seq += 1
        rec.free = self.seq
        self.live_bytes -= n
        self.live_rounded -= _round(n)
        self.transients[label] = max(self.transients.get(label, 0), n)

    def _update_peaks(self) -> None:
        if not self.measuring and self.cur_phase is not Phase.LOAD:
            return
        lb = self.live_bytes
        ph = self.phase_peaks.get(self.cur_phase)
        if ph is None:
            ph = self.phase_peaks[self.cur_phase] = Peak()
        if lb > ph.bytes:
            ph.bytes, ph.at = lb, self.seq
        if self.measuring:
            if lb > self.peak.bytes:
                self.peak.bytes, self.peak.at = lb, self.seq
            if self.live_rounded > self.peak_rounded:
                self.peak_rounded = self.live_rounded

    def track_existing(self, tensor: torch.Tensor) -> Record | None:
        """Register a storage created outside the mode (counted from now)."""
        return self._track(tensor, "existing")

    def start_measure(self) -> None:
        """Forget finished records and reset the peaks: what follows is the measured step."""
        self.records = [r for r in self.records if r.free is None]
        self.measuring = True
        self.peak = Peak(self.live_bytes, self.seq)
        self.peak_rounded = self.live_rounded
        load = self.phase_peaks.get(Phase.LOAD)
        self.phase_peaks = {Phase.LOAD: load} if load else {}
        self.first_measured_fwd = len(self.fwd_ends) + (1 if self.cur_phase is Phase.FORWARD else 0)
        self.first_measured_rec = len(self.rec_ends)
        self.transients = {}

    def stop(self) -> None:
        self.phase(None)
        self.measuring = False

    # -- StepHooks ---------------------------------------------------------------------------------
    def phase(self, phase: Phase | None) -> None:
        if self.cur_phase is Phase.FORWARD and self.fwd_index is not None:
            self.fwd_ends.append(self.seq)
            self.fwd_index = None
        self.cur_phase = phase
        if phase is Phase.FORWARD:
            self.fwd_index = len(self.fwd_ends)
        if phase is not None:
            self._update_peaks()

    def tag(self, tensor: Any, component: Component) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != self.device_type:
            return
        if is_traceable_wrapper_subclass(tensor):
            for name in tensor.__tensor_flatten__()[0]:
                if isinstance(getattr(tensor, name), torch.Tensor):
                    self.tag(getattr(tensor, name), component)
            return
        rec = self.live.get(tensor.untyped_storage()._cdata) or self.track_existing(tensor)
        if rec is not None:
            rec.tag = component

    def enter(self, component: Component) -> None:
        self.scopes.append(component)

    def exit(self, component: Component) -> None:
        for i in range(len(self.scopes) - 1, -1, -1):
            if self.scopes[i] is component:
                del self.scopes[i]
                return

    @contextmanager
    def recompute(self, layer: Any) -> Iterator[None]:
        prev_layer, prev_rec, prev_where = self.layer, self.rec_index, self.where
        self.rec_index = len(self.rec_ends)
        self.layer = self.layer_of.get(id(layer))
        self.where = []
        try:
            yield
        finally:
            # Early-stopped recomputation unwinds by an exception whose traceback still holds the
            # recomputed frames' locals here; they die when checkpoint's unpack hook handles it. The
            # recomputation's end is therefore taken at the next allocation (the layer's backward).
            self.rec_ends.append(self.seq)
            self._rec_end_pending = len(self.rec_ends) - 1
            self.layer, self.rec_index, self.where = prev_layer, prev_rec, prev_where

    def event(self, name: str, trainee: Any) -> None:
        if name == "built":
            for t, comp in trainee.parameter_components():
                self.tag(t, comp)
        elif name == "after_backward":
            for p in trainee.trainable_parameters():
                if p.grad is not None:
                    self.tag(p.grad, Component.GRADIENTS)
        elif name == "after_optimizer_step":
            for p in trainee.trainable_parameters():
                if p.grad is not None:
                    self.tag(p.grad, Component.GRADIENTS)
            for st in trainee.optimizer.state.values():
                for v in (st.values() if isinstance(st, dict) else ()):
                    if isinstance(v, torch.Tensor):
                        self.tag(v, Component.OPTIMIZER_STATES)

    # -- layers -----------------------------------------------------------------------------------
    def watch_layers(self, layers, sample: int | None) -> None:
        """Follow which decoder layer (and, in ``sample``, which submodule) allocates each storage."""
        self.sample_layer = sample
        for i, layer in enumerate(layers):
            self.layer_of[id(layer)] = i
            layer.register_forward_pre_hook(functools.partial(self._layer_pre, i))
            layer.register_forward_hook(self._layer_post)
            if i == sample:
                for name, sub in layer.named_modules():
                    if name:
                        sub.register_forward_pre_hook(functools.partial(self._sub_pre, name))
                        sub.register_forward_hook(self._sub_post)

    def _layer_pre(self, i, module, args):
        self.layer = i
        self.where = []

    def _layer_post(self, module, args, out):
        self.layer = None

    def _sub_pre(self, name, module, args):
        self.where.append(name)

    def _sub_post(self, module, args, out):
        if self.where:
            self.where.pop()

    # -- results ------------------------------------------------------------------------------------
    def component(self, r: Record) -> Component:
        if r.tag is not None:
            return r.tag
        if r.scope is not None:
            return r.scope
        if r.rec is not None and r.rec < len(self.rec_ends):
            end = self.rec_ends[r.rec]
            return Component.ACTIVATIONS if r.free is None or r.free > end else Component.TEMPORARIES
        if r.fwd is not None:
            end = self.fwd_ends[r.fwd] if r.fwd < len(self.fwd_ends) else None
            if end is None or r.free is None or r.free > end:
                return Component.ACTIVATIONS
        return Component.TEMPORARIES

    def breakdown(self, at: int) -> dict[Component, int]:
        out: dict[Component, int] = {}
        for r in self.records:
            if r.alive_at(at):
                c = self.component(r)
                out[c] = out.get(c, 0) + r.nbytes
        return out

    def layer_saved(self, *, recompute: bool = False) -> dict[str, dict[str, int]]:
        """Storages the sampled layer allocated in the first measured forward (or recomputation)
        and still alive when it ended, by ``submodule:op`` and by component."""
        ops: dict[str, int] = {}
        comps: dict[str, int] = {}
        if recompute:  # backward runs the layers in reverse: the sampled layer's first recomputation
            ends = self.rec_ends
            first = self.first_measured_rec or 0
            idx = min((r.rec for r in self.records if r.rec is not None and r.rec >= first
                       and r.layer == self.sample_layer and r.layer is not None), default=None)
        else:
            idx, ends = self.first_measured_fwd, self.fwd_ends
        if idx is None or idx >= len(ends):
            return {"ops": ops, "components": comps}
        end = ends[idx]
        for r in self.records:
            if r.layer != self.sample_layer or r.layer is None:
                continue
            if (r.rec if recompute else r.fwd) != idx or (not recompute and r.rec is not None):
                continue
            if not (r.free is None or r.free > end):
                continue
            c = self.component(r)
            comps[c.value] = comps.get(c.value, 0) + r.nbytes
            key = f"{r.where or '(layer)'}:{r.op}" + ("" if c is Component.ACTIVATIONS else f" [{c.value}]")
            ops[key] = ops.get(key, 0) + r.nbytes
        return {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "components": comps}

    # -- CUDA kernel workspaces (see the module docstring) --------------------------------------
    def workspace(self, func, op: str, args, kwargs, out) -> int:
        if not self.emulate_workspaces:
            return 0
        if op == "aten::_scaled_dot_product_flash_attention_backward":
            return _flash_bwd_workspace(args)
        if op == "aten::_scaled_dot_product_efficient_attention_backward":
            q = args[1]
            return 4 * q.shape[0] * q.shape[1] * q.shape[2]  # delta [b, h, s_q] fp32
        if op == "bitsandbytes::gemm_4bit":
            return _gemm_4bit_workspace(args, kwargs)
        if op == "aten::embedding_dense_backward":
            grad, indices = args[0], args[1]
            n_idx = indices.numel()
            return 3 * 8 * n_idx + 4 * n_idx * grad.shape[-1]  # sort keys/indices, segment offsets, fp32 partials
        return 0


def _flash_bwd_workspace(args) -> int:
    """FlashAttention-2 ``mha_bwd`` (aten/src/ATen/native/transformers/cuda/flash_attn/flash_api.cpp)."""
    q, k = args[1], args[2]
    b, h, s_q, d = q.shape
    h_k, s_k = k.shape[1], k.shape[2]

    def rnd(x, m):
        return -(-x // m) * m

    d_r = rnd(d, 32) if d <= 128 else rnd(d, 64)
    s_q_r = rnd(s_q, 128)
    block_c = 128 if d > 64 else 256
    ws = 4 * b * h * s_q_r  # softmax_d
    if s_k > block_c:  # the dq accumulation loop
        ws += 4 * b * s_q_r * h * d_r  # dq_accum fp32
    if h_k != h:  # MQA/GQA: dK/dV expanded to every query head, summed afterwards
        ws += 2 * b * s_k * h * d * q.element_size()
    return ws


def _gemm_4bit_workspace(args, kwargs) -> int:
    """bitsandbytes 0.50 ``gemm_4bit`` on CUDA: past the custom kernel's M range it dequantises.

    ``_dequant_linear_fallback``: fp32 absmax (nested: dequantised + offset, two tensors),
    then the [N, K] weight in A's dtype, then ``F.linear``. The custom kernel takes M <= 4
    rows on every architecture (``_GEMM_4BIT_CUSTOM_FLOOR_M``); above that the choice is
    per-arch, and for training shapes (M = tokens >= 512, large weights) it dequantises.
    """
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit", "absmax_code",
             "absmax_offset")
    p = dict(zip(names, args))
    p.update(kwargs)
    a, shape = p["A"], p["shapeB"]
    m = a.numel() // a.shape[-1]
    if m <= 4:
        return 0
    n, k = int(shape[0]), int(shape[1])
    ws = n * k * a.element_size()
    if p.get("absmax_8bit") is not None:
        ws += 2 * 4 * p["absmax_8bit"].numel()
    return ws
