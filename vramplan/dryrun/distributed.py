"""Distributed dry run: the real multi-GPU engines traced per rank, in N local CPU processes.

``distributed_dryrun(model, method, gpus=N, strategy=...)`` spawns N processes
(``torch.multiprocessing``, the ``gloo`` backend on 127.0.0.1), each of which builds the
model from its config with random weights on CPU (real storages: collectives need them),
wraps it with the engine of the strategy, runs a warm-up step and one measured steady-state
step, and counts its own live tensor bytes with the single-device dry run's tracker
(:mod:`vramplan.dryrun.tracker`). Every rank reports its peak, its phase peaks and the
components at its peak, with the communication buffers named as such
(:attr:`~vramplan.taxonomy.Component.ALLGATHER_BUFFERS`,
:attr:`~vramplan.taxonomy.Component.REDUCE_BUFFERS`).

Engines (``ENGINES``):

* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (default ``bucket_cap_mb=25``,
  ``gradient_as_bucket_view=False``): its gradient buckets are allocated at construction.
* ``zero1`` (torch): DDP plus ``torch.distributed.optim.ZeroRedundancyOptimizer`` (the
  optimiser states of a rank's partition only; updated parameters broadcast by their owner).
* ``fsdp`` and ``zero3`` (torch): FSDP2, ``torch.distributed.fsdp.fully_shard`` on every
  decoder layer and on the root, ``reshard_after_forward`` passed to both as torchtune's
  ``shard_model`` and accelerate's FSDP2 plugin pass it (True by default: ZeRO-3).
* ``zero2`` (torch): FSDP2 with ``reshard_after_forward=False`` (parameters stay gathered from
  forward to backward; ``SHARD_GRAD_OP``), the torch engine closest to ZeRO-2.
* ``deepspeed``: ``deepspeed.initialize`` with ZeRO stage 1, 2 or 3 on DeepSpeed's CPU
  accelerator (``DS_ACCELERATOR=cpu``, gloo), when DeepSpeed is installed (``engine="deepspeed"``).

What the tracker sees: every storage a dispatched op allocates, plus the storages FSDP2
resizes in place (``UntypedStorage.resize_``: its unsharded parameters are freed and
re-allocated that way, ``torch/distributed/fsdp/_fully_shard/_fsdp_param.py``
``alloc_storage``/``free_storage``), which are counted as a free and an allocation.
CPU runs have no CUDA streams: the order of allocations and frees is the CPU order of the
engine's code, which is what the CUDA caching allocator sees too (frees are stream-ordered
but the allocator reuses a block only once the recording stream's work is done; FSDP2
avoids ``record_stream`` by keeping the previous all-gather result alive until the next
copy-out, a rule it applies on every device).

Importing this module does not import torch.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from dataclasses import dataclass, field

from ..config import TrainConfig, make_config
from ..distributed import STRATEGY_DEFS, EngineOptions
from ..errors import MissingDependencyError, VramplanError
from ..models import ModelSpec, get_model
from ..results import jsonable
from ..taxonomy import TENSOR_COMPONENTS, Component, Phase

ENGINES = ("torch", "deepspeed")
PRECISIONS = ("bf16", "fp32")
#: host memory the ranks together may take (planner's estimate), bytes
HOST_BUDGET = 2 * 2**30
#: steps before the measured one: the first creates the optimiser states, the second DDP's rebuilt
#: gradient buckets (``Reducer`` re-buckets in the first forward after a backward, in gradient order)
WARMUP_STEPS = 2


def supervised_methods() -> tuple[str, ...]:
    """The methods the distributed dry run runs: supervised steps, from the methods' attributes
    (methods.toml): one policy copy and its one adapter, the model's own causal-LM loss, one sequence per
    example, no rollout; the listed ones (not the 4-bit fallbacks reached through another method)."""
    from ..methods import registry

    return tuple(n for n, md in registry().items()
                 if md.loss == "causal_lm" and not md.rollout and md.sequences_per_example == 1
                 and len(md.copies) == 1 and len(md.adapters) == 1 and md.listed)
#: engine defaults (cited)
DDP_BUCKET_CAP_MB = 25  # torch.nn.parallel.DistributedDataParallel(bucket_cap_mb=25) (DDP docs)
DS_DEFAULTS = {  # deepspeed/runtime/zero/config.py (DeepSpeedZeroConfig field defaults)
    "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


@dataclass
class RankTrace:
    """One rank's measured step: tensor peak, phase peaks and components at the peak (bytes)."""

    rank: int
    peak_bytes: int
    peak_phase: Phase
    phases: dict[Phase, int]
    components: dict[Component, int]
    phase_components: dict[Phase, dict[Component, int]] = field(default_factory=dict)
    loss: float = float("nan")
    #: gloo's staging copy inside a reduce-scatter (not on NCCL), left out of the counts above
    gloo_staging_bytes: int = 0

    def to_json(self) -> dict:
        return {"rank": self.rank, "peak_bytes": self.peak_bytes, "peak_phase": self.peak_phase.value,
                "phases": {p.value: v for p, v in self.phases.items()},
                "components": {c.value: v for c, v in self.components.items() if v},
                "phase_components": {p.value: {c.value: v for c, v in d.items() if v}
                                     for p, d in self.phase_components.items()},
                "loss": self.loss, "gloo_staging_bytes": self.gloo_staging_bytes}


@dataclass
class DistributedDryRunResult:
    """Per-rank traces of one configuration under one strategy and engine."""

    model: str
    method: str
    gpus: int
    strategy: str
    engine: str
    engine_desc: str
    config: TrainConfig
    options: dict
    ranks: list[RankTrace]
    packages: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        """The largest per-rank tensor peak (bytes)."""
        return max(r.peak_bytes for r in self.ranks)

    @property
    def rank_peaks(self) -> list[int]:
        return [r.peak_bytes for r in self.ranks]

    def to_json(self) -> dict:
        return {"source": "dryrun-distributed", "model": self.model, "method": self.method, "gpus": self.gpus,
                "strategy": self.strategy, "engine": self.engine, "engine_desc": self.engine_desc,
                "options": jsonable(self.options), "config": self.config.to_json() if hasattr(self.config, "to_json")
                else None, "peak_bytes": self.peak_bytes, "ranks": [r.to_json() for r in self.ranks],
                "packages": dict(self.packages), "seconds": round(self.seconds, 3), "notes": list(self.notes),
                "quantity": "allocated (live tensor storages per rank)"}

    def render(self, console) -> None:
        from ..units import fmt_bytes

        console.print(f"[green]distributed dry run: {self.engine_desc}, {self.gpus} ranks (gloo on CPU), "
                      f"{self.model} {self.method}[/green]", highlight=False)
        phases = (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP)
        console.print("rank        peak  at              " + "".join(f"{p.value:>16}" for p in phases),
                      highlight=False, soft_wrap=True)
        for r in self.ranks:
            console.print(f"{r.rank:>4}  {fmt_bytes(r.peak_bytes):>10}  {r.peak_phase.value:<14}"
                          + "".join(f"{fmt_bytes(r.phases.get(p, 0)):>16}" for p in phases),
                          highlight=False, soft_wrap=True)
        r0 = max(self.ranks, key=lambda r: r.peak_bytes)
        console.print(f"components at rank {r0.rank}'s peak (tensor bytes): " + ", ".join(
            f"{c.value} {fmt_bytes(v)}" for c, v in sorted(r0.components.items(), key=lambda kv: -kv[1]) if v),
            highlight=False)
        if r0.gloo_staging_bytes:
            console.print(f"left out: gloo's reduce-scatter staging copy ({fmt_bytes(r0.gloo_staging_bytes)}; NCCL "
                          "reduce-scatters in place)", highlight=False)
        for n in self.notes:
            console.print(f"note: {n}", highlight=False)


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _deepspeed_stage(strategy: str) -> int | None:
    """The DeepSpeed ZeRO stage that runs ``strategy`` (vramplan.distributed.Strategy), None: none ("single" too)."""
    s = STRATEGY_DEFS.get(strategy)
    return None if s is None else s.deepspeed_stage


def resolve_engine(strategy: str, engine: str | None) -> str:
    """The engine that runs ``strategy``: DeepSpeed for zero1/2/3 when asked for (or ``auto`` and installed)."""
    if engine in (None, "auto"):
        return "deepspeed" if _deepspeed_stage(strategy) and deepspeed_available() else "torch"
    if engine not in ENGINES:
        from ..errors import unknown

        raise unknown("engine", engine, ENGINES)
    if engine == "deepspeed":
        if _deepspeed_stage(strategy) is None:
            raise VramplanError(f"DeepSpeed runs zero1, zero2 or zero3, not {strategy}", "use --engine torch")
        if not deepspeed_available():
            raise MissingDependencyError("DeepSpeed is not installed: its ZeRO engine cannot be traced here",
                                         "pip install deepspeed (its CPU accelerator runs with gloo), or use "
                                         "--engine torch (ZeroRedundancyOptimizer / FSDP2)")
    return engine


def engine_description(strategy: str, engine: str, reshard_after_forward: bool | None = None) -> str:
    if engine == "deepspeed":
        return f"DeepSpeed ZeRO-{_deepspeed_stage(strategy)} (CPU accelerator, gloo)"
    s = STRATEGY_DEFS[strategy]
    return s.torch_title + ("" if not s.stack_fsdp or reshard_after_forward in (None, True)
                            else ", reshard_after_forward=False")


# -- the per-rank worker (runs in the spawned processes) ---------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import logging
    import warnings

    if any(j.get("engine") == "deepspeed" for j in jobs):
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed picks its accelerator at import
    warnings.simplefilter("ignore")
    for name in ("transformers", "torchao", "bitsandbytes", "torch.distributed", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = []
    try:
        for job in jobs:
            try:
                out.append(_run_job(rank, world, job))
            except Exception as exc:  # reported by the parent as one line
                if os.environ.get("VRAMPLAN_DEBUG"):
                    import traceback

                    traceback.print_exc()
                out.append({"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"})
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.pkl.tmp"), "wb") as fh:
            pickle.dump(out, fh)
        os.replace(os.path.join(outdir, f"rank{rank}.pkl.tmp"), os.path.join(outdir, f"rank{rank}.pkl"))
        dist.destroy_process_group()


def _run_job(rank: int, world: int, job: dict) -> RankTrace:
    import gc

    import torch

    spec, cfg = job["spec"], job["cfg"]
    tracker = _RankTracker("cpu")
    patches = _Patches(tracker)
    torch.manual_seed(1234)  # every rank builds the same weights, as after a checkpoint load
    _ACTIVE["tracker"] = tracker
    with patches, tracker.mode:
        trainee = _build_wrapped(spec, cfg, job, tracker)
        tracker.phase(None)
        for _ in range(WARMUP_STEPS):  # optimiser states and lazily built engine buffers come to exist
            trainee.step()
        gc.collect()
        # no cyclic collection inside the measured step: the cycle collector runs at allocation-count
        # thresholds, so where it frees garbage cycles would differ from rank to rank and run to run
        gc.disable()
        try:
            tracker.start_measure()
            out = trainee.step()
            tracker.stop()
        finally:
            gc.enable()
    phases: dict[Phase, int] = {}
    phase_components: dict[Phase, dict[Component, int]] = {}
    best, peak_phase = -1, Phase.FORWARD
    for p in (Phase.FORWARD, Phase.BACKWARD, Phase.OPTIMIZER_STEP):
        pk = tracker.phase_peaks.get(p)
        if pk is None or pk.bytes < 0:
            continue
        phases[p] = int(pk.bytes)
        phase_components[p] = {c: int(v) for c, v in tracker.breakdown(pk.at).items() if v}
        if pk.bytes > best:
            best, peak_phase = pk.bytes, p
    at_peak = tracker.breakdown(tracker.peak.at)
    comps = {c: int(at_peak.get(c, 0)) for c in TENSOR_COMPONENTS}
    loss = out.get("loss") if isinstance(out, dict) else None
    return RankTrace(rank=rank, peak_bytes=int(tracker.peak.bytes), peak_phase=peak_phase, phases=phases,
                     components=comps, phase_components=phase_components,
                     loss=float(loss) if loss is not None else float("nan"),
                     gloo_staging_bytes=int(tracker.staging_bytes))


def _tracker_base():
    from .tracker import Tracker

    return Tracker


def _make_rank_tracker():
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    Tracker = _tracker_base()

    class RankTracker(Tracker):
        """The dry run's tracker plus in-place storage resizes and engine-side tensors."""

        #: inside a gloo collective: storages first seen there are gloo's own staging (see _Patches)
        staging = False
        staging_bytes = 0

        def _track(self, x, op):
            if self.staging and isinstance(x, torch.Tensor) and x.device.type == self.device_type \
                    and not is_traceable_wrapper_subclass(x) and x.untyped_storage()._cdata not in self.live:
                self.staging_bytes = max(self.staging_bytes, x.untyped_storage().nbytes())
                return None
            return super()._track(x, op)

        def resized(self, storage) -> None:
            key = storage._cdata
            n = storage.nbytes()
            rec = self.live.pop(key, None)
            tag = rec.tag if rec is not None else None
            if rec is not None:
                if rec.wref is not None:
                    rec.wref = None
                self.seq += 1
                rec.free = self.seq
                self.live_bytes -= rec.nbytes
                from .tracker import _round

                self.live_rounded -= _round(rec.nbytes)
            if n > 0:
                import functools
                import weakref

                new = self._alloc(n, "resize_")
                new.tag = tag
                new.wref = weakref.ref(storage, functools.partial(self._on_free, key))
                self.live[key] = new

        def tag_local(self, tensor, component) -> None:
            """Tag a DTensor's local shard (or a plain tensor)."""
            if isinstance(tensor, torch.Tensor) and is_traceable_wrapper_subclass(tensor):
                tensor = getattr(tensor, "_local_tensor", tensor)
            self.tag(tensor, component)

        #: called with (event name, trainee) on every event (the accumulation's gradient-sync switch)
        listeners: tuple = ()

        def event(self, name: str, trainee) -> None:
            for fn in self.listeners:
                fn(name, trainee)
            if name == "built":
                for t, comp in _parameter_components(trainee):
                    self.tag_local(t, comp)
                return
            if name in ("after_backward", "after_optimizer_step"):
                for p in trainee.trainable_parameters():
                    g = p.grad
                    if g is not None:
                        self.tag_local(g, Component.GRADIENTS)
                for t in trainee.extras.get("grad_tensors", lambda: [])():
                    self.tag_local(t, Component.GRADIENTS)
            if name == "after_optimizer_step":
                for t in _optimizer_tensors(trainee):
                    self.tag_local(t, Component.OPTIMIZER_STATES)
                for t in trainee.extras.get("master_tensors", lambda: [])():
                    self.tag_local(t, Component.MASTER_WEIGHTS)

    return RankTracker


def _RankTracker(device: str):
    return _make_rank_tracker()(device)


def _parameter_components(trainee):
    from ..methods import Adapter

    peft = trainee.recipe.adapter.is_peft and trainee.recipe.adapter is not Adapter.FULL
    seen = set()
    for c in trainee.copies.values():
        for p in c.module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                from ..runtime.nf4 import quant_state_tensors

                yield p, Component.WEIGHTS
                for t in quant_state_tensors(qs):
                    yield t, Component.QUANT_STATE
            else:
                comp = Component.ADAPTERS if peft and p.requires_grad else Component.WEIGHTS
                yield p, comp
                if getattr(p, "ds_tensor", None) is not None:  # DeepSpeed ZeRO-3's own partition
                    yield p.ds_tensor, comp
        for b in c.module.buffers():
            yield b, Component.WEIGHTS


def _optimizer_tensors(trainee):
    import torch

    opt = trainee.optimizer
    inner = getattr(opt, "optim", None) or getattr(opt, "optimizer", None)  # ZeRO wrappers' local optimiser
    for o in ([inner] if inner is not None else []) + [opt]:
        for st in getattr(o, "state", {}).values():
            for v in (st.values() if isinstance(st, dict) else ()):
                if isinstance(v, torch.Tensor):
                    yield v


class _Patches:
    """Route FSDP2's in-place storage resizes and its collectives' buffers to the tracker."""

    def __init__(self, tracker):
        self.tracker = tracker
        self._saved = []

    def __enter__(self):
        import torch

        tr = self.tracker
        orig_resize = torch.UntypedStorage.resize_

        def resize_(storage, size):
            out = orig_resize(storage, size)
            tr.resized(storage)
            return out

        self._saved.append((torch.UntypedStorage, "resize_", orig_resize))
        torch.UntypedStorage.resize_ = resize_
        import torch.distributed as dist

        # gloo has no reduce-scatter kernel: c10d emulates it with an all-reduce of a copy of the input,
        # a buffer NCCL's native reduce-scatter does not have. Storages first seen inside the call are
        # that staging copy; they are left out of the per-rank count (RankTrace.gloo_staging_bytes).
        # Both run synchronously and return only once gloo's worker thread has let go of their tensors; an
        # asynchronous caller (FSDP2) gets a completed Work that holds none. gloo's Work keeps the collective's
        # input and output until its worker thread drops it, and on a busy host that thread sometimes did so
        # after FSDP2 had dropped the buffer: a unit's all-gather output (0.3-0.5 MiB here) was then freed on
        # that thread at a random later point of the step (one rank's peak that much higher in about one run
        # in ten). NCCL's buffers are freed where FSDP2 drops them, which is what this leaves.
        orig_rs = dist.reduce_scatter_single

        def reduce_scatter_single(*args, async_op=False, **kwargs):
            return _collective(orig_rs, tr, args, kwargs, async_op)

        self._saved.append((dist, "reduce_scatter_single", orig_rs))
        dist.reduce_scatter_single = reduce_scatter_single
        # the same for gloo's all-gather: FSDP2 allocates the output before the call, so a storage first
        # seen inside it is the backend's own
        orig_ag = dist.all_gather_single

        def all_gather_single(*args, async_op=False, **kwargs):
            return _collective(orig_ag, tr, args, kwargs, async_op)

        self._saved.append((dist, "all_gather_single", orig_ag))
        dist.all_gather_single = all_gather_single
        try:
            from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
        except ImportError:  # pragma: no cover
            return self
        for name, comp in (("unshard", Component.ALLGATHER_BUFFERS), ("wait_for_unshard", Component.ALLGATHER_BUFFERS),
                           ("post_backward", Component.REDUCE_BUFFERS)):
            orig = getattr(pg.FSDPParamGroup, name)
            self._saved.append((pg.FSDPParamGroup, name, orig))
            setattr(pg.FSDPParamGroup, name, _sectioned(orig, tr, comp, name))
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()
        return False


#: how long a collective waits for gloo's worker thread to drop its tensors (seconds)
RELEASE_WAIT = 10.0


def _collective(fn, tracker, args, kwargs, async_op: bool):
    """Run the gloo collective ``fn`` synchronously (its own storages are gloo's staging, left out), wait until
    gloo's worker no longer references its tensors (``Tensor._use_count`` back to the caller's), and return
    a completed Work (or None) as ``async_op`` asks."""
    import torch

    tensors = [x for x in list(args) + list(kwargs.values()) if isinstance(x, torch.Tensor)]
    before = [t._use_count() for t in tensors]
    tracker.staging = True
    try:
        fn(*args, async_op=False, **kwargs)
    finally:
        tracker.staging = False
    deadline = time.monotonic() + RELEASE_WAIT
    while any(t._use_count() > b for t, b in zip(tensors, before)) and time.monotonic() < deadline:
        time.sleep(0.0002)
    return _done_work() if async_op else None


def _done_work():
    """A completed ``torch.distributed.Work`` holding no tensors (what a synchronous collective hands back to
    a caller that asked for an asynchronous one)."""
    import torch.distributed as dist

    global _DoneWork
    if _DoneWork is None:
        class _Done(dist.distributed_c10d.Work):
            def wait(self, timeout=None):
                return True

            def is_completed(self):
                return True

        _DoneWork = _Done
    return _DoneWork()


_DoneWork = None


def _sectioned(fn, tracker, comp, name):
    import functools

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        if name == "post_backward":  # the unsharded gradients about to be reduce-scattered are gradients
            for fp in getattr(self, "fsdp_params", ()):
                for attr in ("unsharded_accumulated_grad", "_unsharded_param"):
                    t = getattr(fp, attr, None)
                    g = t.grad if attr == "_unsharded_param" and t is not None else t
                    if g is not None:
                        tracker.tag(g, Component.GRADIENTS)
        tracker.enter(comp)
        try:
            return fn(self, *args, **kwargs)
        finally:
            tracker.exit(comp)

    return wrapper


def _section_ddp_buckets(tracker) -> None:
    """DDP's ``Reducer`` rebuilds its buckets in the first forward after a backward (``_pre_forward``
    calls ``reducer._rebuild_buckets()``): storages allocated there are its gradient buckets."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if getattr(DDP._pre_forward, "_vramplan", False):
        return
    orig = DDP._pre_forward

    def _pre_forward(self, *args, **kwargs):
        tr = _ACTIVE.get("tracker")
        if tr is None:
            return orig(self, *args, **kwargs)
        with tr.section(Component.REDUCE_BUFFERS):
            return orig(self, *args, **kwargs)

    _pre_forward._vramplan = True
    DDP._pre_forward = _pre_forward


_ACTIVE: dict = {}


def _build_wrapped(spec: ModelSpec, cfg: TrainConfig, job: dict, tracker):
    """Build the copies as :func:`vramplan.runtime.build` does, wrap them with the engine, then the optimiser."""
    import torch
    import torch.distributed as dist

    from ..methods import Role
    from ..precision import get_regime
    from ..runtime.build import Trainee, attn_impl, build_copy, make_optimizer
    from ..taxonomy import Phase as P

    regime = get_regime(cfg.precision)
    notes: list[str] = []
    trainee = Trainee(spec=spec, cfg=cfg, recipe=cfg.recipe, regime=regime, device="cpu", fake=False, copies={},
                      optimizer=None, hooks=tracker, notes=notes)
    tracker.phase(P.LOAD)
    attn = attn_impl(cfg, "cpu", False, notes, spec)
    for copy in cfg.recipe.copies:
        trainee.copies[copy.role] = build_copy(trainee, copy, attn)
    pol = trainee.copies[Role.POLICY]
    head = pol.inner.get_output_embeddings()
    head.register_forward_pre_hook(trainee._head_pre_hook)
    head.register_forward_hook(trainee._head_post_hook)
    strategy, engine = job["strategy"], job["engine"]
    opts = job["options"]
    if engine == "deepspeed":
        from .deepspeed_engine import wrap_deepspeed

        wrap_deepspeed(trainee, strategy, opts, tracker)
        tracker.event("built", trainee)
        return trainee
    if strategy == "single":  # one process's step, no engine (the planner's single-GPU baseline)
        tracker.event("built", trainee)
        trainee.optimizer = make_optimizer(trainee.trainable_parameters(), cfg, regime, "cpu", False, notes)
    elif STRATEGY_DEFS[strategy].torch_replica:  # DDP (ZeRO-1: + ZeroRedundancyOptimizer)
        from torch.nn.parallel import DistributedDataParallel as DDP

        _section_ddp_buckets(tracker)
        tracker.event("built", trainee)
        with tracker.section(Component.REDUCE_BUFFERS):  # the gradient buckets are allocated at construction
            pol.module = DDP(pol.module, bucket_cap_mb=opts.get("bucket_cap_mb") or DDP_BUCKET_CAP_MB,
                             gradient_as_bucket_view=bool(opts.get("gradient_as_bucket_view", False)))
        params = trainee.trainable_parameters()
        if STRATEGY_DEFS[strategy].shards_states:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            kw = {"foreach": True} if not regime.training_loop.fused_optimizer else {"fused": False, "foreach": True}
            trainee.optimizer = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-5, **kw)
        else:
            trainee.optimizer = make_optimizer(params, cfg, regime, "cpu", False, notes)
    else:
        from torch.distributed.fsdp import fully_shard

        from . import decoder_layers

        reshard = opts.get("reshard_after_forward")
        if reshard is None:
            reshard = STRATEGY_DEFS[strategy].reshard_after_forward
        for layer in decoder_layers(pol.inner):
            fully_shard(layer, reshard_after_forward=reshard)
        fully_shard(pol.module, reshard_after_forward=reshard)
        tracker.event("built", trainee)
        trainee.optimizer = make_optimizer(trainee.trainable_parameters(), cfg, regime, "cpu", False, notes)
    del dist
    _skip_sync_while_accumulating(trainee, strategy, opts, tracker)
    return trainee


def _skip_sync_while_accumulating(trainee, strategy: str, opts: dict, tracker) -> None:
    """With ``cfg.grad_accum > 1`` and the ``no_sync`` option, every micro-batch but the last runs without
    gradient synchronisation, as accumulation loops do: DDP's ``no_sync()`` (which clears
    ``require_backward_grad_sync`` for the micro-batch; Lightning Fabric's ``no_backward_sync``, accelerate's
    ``accumulate``), FSDP2's ``set_requires_gradient_sync(False)`` (its no-sync flavour, which keeps the
    unsharded gradients: pytorch/pytorch PR #126166). Without it every micro-batch synchronises (FSDP2
    reduce-scatters and accumulates the sharded gradients)."""
    ga = trainee.cfg.grad_accum
    no_sync = opts.get("no_sync")
    if no_sync is None:  # the stack's loop (stacks.toml accumulation_no_sync), as the planner assumes
        no_sync = trainee.cfg.stack.accumulation_no_sync
    if ga <= 1 or not no_sync or strategy not in STRATEGY_DEFS:
        return
    module = trainee.copies[next(iter(trainee.copies))].module

    def sync(flag: bool) -> None:
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(flag)
        else:
            module.require_backward_grad_sync = flag

    state = {"micro": 0}

    def listener(name: str, _trainee) -> None:
        if name == "after_backward":
            state["micro"] += 1
            if state["micro"] == ga - 1:
                sync(True)
        elif name == "after_optimizer_step":
            state["micro"] = 0
            sync(False)

    sync(False)
    tracker.listeners = tracker.listeners + (listener,)


# -- the parent ------------------------------------------------------------------------------------

@dataclass
class Job:
    """One configuration of a grid run (all jobs of one :func:`run_jobs` call share the world size)."""

    spec: ModelSpec
    cfg: TrainConfig
    strategy: str
    engine: str = "torch"
    options: dict = field(default_factory=dict)


def _context():
    """A ``forkserver`` context whose server has imported torch, transformers and PEFT once: every
    rank of every job is a fresh process (no engine state carried from one job to the next) that
    starts in well under a second."""
    import multiprocessing as _mp

    ctx = _mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "transformers", "peft", "vramplan.runtime",
                                "vramplan.dryrun.tracker", __name__])
    return ctx


def _run_group(ctx, payload: list, gpus: int, timeout: float) -> list:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="vramplan-dist-") as outdir:
        procs = [ctx.Process(target=_worker, args=(r, gpus, port, payload, outdir), daemon=True) for r in range(gpus)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        if hung:
            raise VramplanError(f"the distributed dry run did not finish within {timeout:.0f} s",
                                "use a smaller model (--layers) or fewer ranks")
        results = []
        for r in range(gpus):
            path = os.path.join(outdir, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise VramplanError(f"rank {r} of the distributed dry run exited with code {procs[r].exitcode} "
                                    "before reporting", "run again with fewer ranks or a smaller model")
            with open(path, "rb") as fh:
                results.append(pickle.load(fh))
    return results


def run_jobs(jobs: list[Job], gpus: int, timeout: float = 600.0) -> list[list[RankTrace] | str]:
    """Run every job in its own group of ``gpus`` fresh ranks; per job, the rank traces or an error line.

    One group per job: FSDP2 and DDP keep module-level and communicator state, and a second job in
    the same processes was seen to trace differently from the same job run first. Each job runs once:
    the trace is deterministic (no cycle collection inside the measured step; gloo's collectives return
    only once its worker thread has let go of their tensors, see :class:`_Patches`).
    """
    if not jobs:
        return []
    deepspeed = any(j.engine == "deepspeed" for j in jobs)
    saved = os.environ.get("DS_ACCELERATOR")
    if deepspeed:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read by DeepSpeed's accelerator at import, in the ranks
    try:
        ctx = _context()
        out: list[list[RankTrace] | str] = []
        t_end = time.monotonic() + timeout
        for j in jobs:
            payload = [{"spec": j.spec, "cfg": j.cfg, "strategy": j.strategy, "engine": j.engine,
                        "options": dict(j.options)}]
            results = _run_group(ctx, payload, gpus, max(1.0, t_end - time.monotonic()))
            per = [results[r][0] for r in range(gpus)]
            err = next((x["error"] for x in per if isinstance(x, dict) and "error" in x), None)
            out.append(err if err else per)
    finally:
        if deepspeed:
            if saved is None:
                os.environ.pop("DS_ACCELERATOR", None)
            else:
                os.environ["DS_ACCELERATOR"] = saved
    return out


def _packages(engine: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft") + (("deepspeed",) if engine == "deepspeed" else ()):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def distributed_config(spec: ModelSpec, method: str, *, precision: str = "bf16", **kw) -> TrainConfig:
    """The :class:`TrainConfig` of a distributed dry run (``bf16`` or ``fp32``: no autocast on CPU)."""
    methods = supervised_methods()
    if method not in methods:
        raise VramplanError(f"the distributed dry run runs supervised steps ({', '.join(methods)}), not {method}",
                            "`vramplan estimate --gpus N --strategy S` plans DPO/PPO on paper")
    prec = (precision or "bf16").lower()
    if prec not in PRECISIONS:
        raise VramplanError(f"the distributed dry run runs precision bf16 or fp32, not {precision}",
                            "CPU autocast is not CUDA's: bf16-mixed stays with the single-device dry run (meta, "
                            "emulated CUDA autocast)")
    return make_config(spec, method, precision=prec, **kw)


#: the engine option names (:class:`EngineOptions`' fields)
ENGINE_OPTION_NAMES = tuple(EngineOptions.__dataclass_fields__)


@dataclass(frozen=True)
class DistributedDryRunRequest:
    """One distributed dry run: the configuration, the ranks and strategy, the engine and its options.

    ``layers`` caps the decoder depth (the model is otherwise built from its config, random weights);
    ``grad_accum`` micro-batches per step (the sync skipped as ``options.no_sync`` says); ``offload="cpu"``
    cannot be traced on a CPU-only host (there is no device memory to offload from): it is refused.
    """

    model: str | ModelSpec
    method: str = "lora"
    gpus: int = 2
    strategy: str = "fsdp"
    engine: str | None = None
    layers: int | None = 2
    batch: int = 1
    seq: int = 256
    rank: int = 8
    targets: tuple | list | str | None = None
    grad_ckpt: bool | None = False
    precision: str = "bf16"
    attn: str = "eager"
    offload: str | None = None
    grad_accum: int = 1
    options: EngineOptions = EngineOptions()
    #: seconds the ranks may take
    timeout: float = 600.0

    @classmethod
    def build(cls, model: str | ModelSpec, method: str = "lora", **kw) -> "DistributedDryRunRequest":
        """A request from keyword arguments, the engine options (:data:`ENGINE_OPTION_NAMES`) among them."""
        opts = {k: kw.pop(k) for k in ENGINE_OPTION_NAMES if k in kw}
        unknown_keys = set(kw) - set(cls.__dataclass_fields__)
        if unknown_keys:
            raise VramplanError(f"distributed dry run: unknown setting(s) {', '.join(sorted(unknown_keys))}")
        return cls(model=model, method=method, options=EngineOptions(**opts), **kw)


def distributed_dryrun(request: DistributedDryRunRequest | str | ModelSpec, method: str | None = None,
                       **settings) -> DistributedDryRunResult:
    """Trace one steady-state step per rank of ``request.strategy`` over ``request.gpus`` local CPU processes.

    ``request``: a :class:`DistributedDryRunRequest`, or a model name / :class:`ModelSpec` with ``method`` and
    the request's fields (engine options among them) as keywords (:meth:`DistributedDryRunRequest.build`).

    Raises:
        VramplanError: bad input, a configuration the engine rejects, a run that does not finish.
        MissingDependencyError: torch/transformers/peft (or DeepSpeed for ``engine="deepspeed"``) missing.
    """
    if not isinstance(request, DistributedDryRunRequest):
        request = DistributedDryRunRequest.build(request, method or "lora", **settings)
    elif method is not None or settings:
        raise VramplanError("distributed_dryrun takes a request or keyword settings, not both")
    return _run_request(request)


def _run_request(req: DistributedDryRunRequest) -> DistributedDryRunResult:
    from ..distributed import make_parallel, parallel_step_memory
    from . import require_stack_packages

    gpus = req.gpus
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 2 or gpus > 8:
        raise VramplanError(f"the distributed dry run needs 2 to 8 ranks, got --gpus {gpus!r}",
                            "use --gpus 2 or 4 (each rank is a local CPU process)")
    par = make_parallel(gpus, req.strategy, req.offload)
    if par.offload == "cpu":
        raise VramplanError("--offload cpu cannot be traced here: on a CPU-only host there is no device memory to "
                            "offload from", "`vramplan estimate --gpus N --strategy S --offload cpu` plans it on paper")
    strategy = par.strategy
    eng = resolve_engine(strategy, req.engine)
    require_stack_packages("hf")
    spec = get_model(req.model)
    layers = req.layers
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
            raise VramplanError(f"--layers must be a positive integer, got {layers!r}")
        spec = spec.with_layers(min(layers, spec.num_layers))
    cfg = distributed_config(spec, req.method, precision=req.precision, batch=req.batch, seq=req.seq, rank=req.rank,
                             targets=req.targets, grad_ckpt=bool(req.grad_ckpt), attn=req.attn,
                             grad_accum=req.grad_accum)
    opts = req.options.given()
    plan_par = make_parallel(gpus, strategy, engine=eng, torch_adam=eng == "deepspeed", **opts)
    planned = int(parallel_step_memory(spec, cfg, plan_par, components=False).peak)
    if planned * gpus > HOST_BUDGET:
        raise VramplanError(f"{spec.name} with {spec.num_layers} layers needs about {planned * gpus / 2**30:.1f} GiB "
                            f"of host memory over {gpus} ranks", "use --layers 1, a smaller model, or fewer ranks")
    t0 = time.perf_counter()
    res = run_jobs([Job(spec, cfg, strategy, eng, opts)], gpus, timeout=req.timeout)[0]
    if isinstance(res, str):
        raise VramplanError(f"the {engine_description(strategy, eng)} step failed: {res}")
    return DistributedDryRunResult(model=spec.name, method=req.method, gpus=gpus, strategy=strategy, engine=eng,
                                   engine_desc=engine_description(strategy, eng, req.options.reshard_after_forward),
                                   config=cfg, options=opts, ranks=res, packages=_packages(eng),
                                   seconds=time.perf_counter() - t0)
