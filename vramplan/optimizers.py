"""Optimiser state memory (``--optimizer``), as data.

Each optimiser is an entry of ``vramplan/data/optimizers.toml`` (with its source): its state
layout (states per tensor, bytes per state element, per-tensor scalars, factored or blockwise
8-bit states, paged or not), the temporaries its ``step()`` allocates, the bytes its update
streams (:mod:`vramplan.throughput`) and how the runtime constructs it
(:func:`vramplan.runtime.build.make_optimizer`). :class:`OptimizerDef` answers every question
from those fields; no layer compares an optimiser's name.

State bytes are computed per trainable tensor, since 8-bit optimisers keep small tensors in
32-bit and Adafactor factors only matrices.

Sources (the catalogue's ``source`` fields):
* torch.optim.AdamW: ``exp_avg`` and ``exp_avg_sq`` with ``zeros_like(param)`` -- two
  states in the parameter dtype, plus a scalar ``step`` per tensor. The foreach kernel
  (default on CUDA for a plain loop) allocates ``_foreach_sqrt(exp_avg_sqs)``, one
  state-sized temporary, during ``step()``; the fused kernel (HF Trainer's default,
  ``adamw_torch_fused``) allocates none.
* bitsandbytes AdamW8bit / PagedAdamW8bit (``Optimizer2State``): tensors with at least
  ``min_8bit_size`` = 4096 elements keep two uint8 states plus one fp32 absmax per block
  of 256 elements each; smaller tensors keep two fp32 states. Paged states live in CUDA
  unified memory (``cudaMallocManaged``): outside torch's caching allocator, visible to
  nvidia-smi, and evicted to host memory under pressure.
* bitsandbytes PagedAdamW32bit (``Optimizer2State`` with ``optim_bits=32``, HF Trainer
  ``optim="paged_adamw_32bit"``, the QLoRA paper's optimizer): two fp32 states per element
  whatever the parameter dtype (``init_state``: ``get_state_buffer(p, dtype=torch.float32)``
  twice), paged in CUDA unified memory (``get_state_buffer``: tensors of >= 1e5 elements).
* torch.optim.SGD (momentum 0, the HF Trainer default for ``sgd``): no state.
* transformers Adafactor (beta1=None): for a tensor of >= 2 dims, a row and a column
  second-moment vector (``shape[:-1]`` and ``shape[:-2] + shape[-1:]``) in the gradient
  dtype; a vector keeps a full ``exp_avg_sq``; plus a scalar RMS. Its step upcasts a
  16-bit parameter and gradient to fp32 one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

from ._data import load_data
from .errors import VramplanError, unknown
from .precision import get_runner


@dataclass(frozen=True)
class Quantized:
    """Blockwise low-bit states (bitsandbytes ``Optimizer2State``): ``bits`` per element, one
    ``absmax_bytes`` scale per ``block`` elements per state, for tensors of at least ``min_size``
    elements (smaller ones keep fp32 states)."""

    bits: int
    block: int
    absmax_bytes: int
    min_size: int


@dataclass(frozen=True)
class OptimizerDef:
    """One optimiser as ``vramplan/data/optimizers.toml`` declares it (field meanings: its header)."""

    name: str
    summary: str
    paged: bool = False
    #: the optimiser whose states, temporaries and update this one keeps exactly (its paged twin's: on the GPU
    #: while they fit), or None
    same_states_as: str | None = None
    source: str = ""
    #: state tensors per parameter tensor
    states: int = 0
    #: bytes per state element; None: the parameter's bytes per element
    state_bytes_per_element: int | None = None
    #: per-tensor scalar state (AdamW's fp32 ``step``), bytes
    scalar_bytes: int = 0
    #: Adafactor: a tensor of >= 2 dims keeps a row and a column vector
    factored: bool = False
    quantized: Quantized | None = None
    #: what the states are, for the dry run's note on paged states
    state_label: str = ""
    #: short label in plan summaries (the name when the catalogue gives none)
    label: str = ""
    #: its name in sentences ("8-bit AdamW"; the name when the catalogue gives none)
    title: str = ""
    #: a search tries it when no optimiser is fixed (:func:`searched_optimizers`: in the catalogue's order)
    searched: bool = False
    #: names trainer configs give it (HF ``TrainingArguments.optim``, Axolotl ``optimizer``)
    trainer_names: tuple[str, ...] = ()
    #: what planning a trainer name as this optimizer leaves out: trainer name -> note (the plan's assumptions)
    trainer_notes: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    #: state-sized temporaries per tensor in ``step()`` under a plain loop (foreach)
    loop_temp_states: int = 0
    #: fp32 copies of the largest tensor in ``step()`` (Adafactor)
    largest_fp32_copies: int = 0
    #: update bytes streamed per trainable parameter: this x gradient bytes + ``stream_fixed_bytes``
    stream_param_bytes: int = 0
    stream_fixed_bytes: int = 0
    #: factor on the streamed bytes under a plain loop on one GPU (foreach temporaries)
    loop_stream_factor: float = 1.0
    #: achieved fraction of the card's achievable bandwidth in the update
    bandwidth_efficiency: float = 1.0
    #: how the runtime builds it: ``"module:Class"`` and keyword arguments (lr is added)
    cls: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    loop_kwargs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    meta_trainer_class: str = ""
    cuda_class: str = ""
    #: the pip package the class needs (checked with a one-line hint), or ""
    package: str = ""

    def state_bytes(self, shape: Sequence[int], param_bytes: int) -> int:
        """Bytes of optimiser state for one tensor of ``shape`` whose parameter has ``param_bytes`` per element.

        ``states x n x b + scalar_bytes`` for ``n`` elements of ``b`` bytes; blockwise 8-bit:
        ``states x (n x bits/8 + ceil(n / block) x absmax_bytes)`` (fp32 states below ``min_size``);
        factored (>= 2 dims): ``(n / shape[-1] + n / shape[-2]) x b``. Sources: optimizers.toml.
        """
        if self.states == 0:
            return self.scalar_bytes
        numel = _numel(shape)
        per = param_bytes if self.state_bytes_per_element is None else self.state_bytes_per_element
        q = self.quantized
        if q is not None:
            if numel < q.min_size:
                return self.states * numel * 4 + self.scalar_bytes
            blocks = -(-numel // q.block)
            return self.states * numel * q.bits // 8 + self.states * blocks * q.absmax_bytes + self.scalar_bytes
        if self.factored and len(shape) >= 2:
            rows = numel // int(shape[-1])
            cols = numel // int(shape[-2])
            return (rows + cols) * per + self.scalar_bytes
        return self.states * numel * per + self.scalar_bytes

    def total_state_bytes(self, tensors: Iterable[tuple[tuple[int, ...], int, int]]) -> int:
        """Sum :meth:`state_bytes` over ``(shape, count, param_bytes)`` groups.

        Kept per optimiser (this very definition) and groups: a search asks for the same few dozen sums
        hundreds of times. Unhashable groups (list shapes) are summed each time.
        """
        tensors = tuple(tensors)
        key = (self.name, tensors)
        try:
            kept = _TOTALS_CACHE.get(key)
        except TypeError:
            return self._total_state_bytes(tensors)
        if kept is not None and kept[0] is self:
            return kept[1]
        total = self._total_state_bytes(tensors)
        if len(_TOTALS_CACHE) > 1024:
            _TOTALS_CACHE.clear()
        _TOTALS_CACHE[key] = (self, total)
        return total

    def _total_state_bytes(self, tensors: tuple[tuple[tuple[int, ...], int, int], ...]) -> int:
        return sum(count * self.state_bytes(shape, pbytes) for shape, count, pbytes in tensors)

    def step_temporary_bytes(self, tensors: list[tuple[tuple[int, ...], int, int]], runner: str) -> int:
        """Transient bytes allocated inside ``optimizer.step()``.

        Under a runner without the fused kernel (``Runner.fused_optimizer`` False: a plain loop's foreach kernel),
        ``loop_temp_states`` state-sized temporaries
        per tensor (AdamW foreach: one ``exp_avg_sq``-sized ``sqrt`` per dtype group); plus
        ``largest_fp32_copies`` fp32 copies of the largest tensor (Adafactor: its update and the
        upcast parameter and gradient). Fused AdamW, bitsandbytes and SGD: none.
        """
        out = 0
        if self.loop_temp_states and not get_runner(runner).fused_optimizer:
            fixed = self.state_bytes_per_element
            out += self.loop_temp_states * sum(count * _numel(shape) * (pbytes if fixed is None else fixed)
                                               for shape, count, pbytes in tensors)
        if self.largest_fp32_copies and tensors:
            largest = max(_numel(shape) for shape, _c, _b in tensors)
            out += largest * 4 * self.largest_fp32_copies
        return out

    def update_bytes_per_param(self, grad_bytes: int, loop: bool) -> float:
        """Bytes the update streams per trainable parameter (``grad_bytes`` per gradient element).

        ``stream_param_bytes x grad_bytes + stream_fixed_bytes``, times ``loop_stream_factor``
        when ``loop`` (a plain loop's foreach kernel on one GPU). Source: optimizers.toml.
        """
        per = self.stream_param_bytes * grad_bytes + self.stream_fixed_bytes
        if loop and self.loop_stream_factor != 1.0:
            per *= self.loop_stream_factor
        return per


_TOTALS_CACHE: dict = {}  # (name, groups) -> (the definition, its total): OptimizerDef.total_state_bytes


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


_KEYS = {"summary", "source", "states", "state_bytes", "scalar_bytes", "factored", "quantized", "paged", "same_states_as",
         "state_label",
         "label", "title", "searched", "trainer_names", "trainer_notes",
         "loop_temp_states", "largest_fp32_copies", "stream_param_bytes", "stream_fixed_bytes", "loop_stream_factor",
         "bandwidth_efficiency", "class", "kwargs", "loop_kwargs", "trainer_kwargs", "meta_trainer_class",
         "cuda_class", "package"}


def _parse(name: str, e: dict) -> OptimizerDef:
    extra = set(e) - _KEYS
    if extra:
        raise VramplanError(f"optimizers.toml: optimizer {name!r} has unknown field(s) {', '.join(sorted(extra))}")
    try:
        sb = e.get("state_bytes", "param")
        if sb != "param" and (not isinstance(sb, int) or sb <= 0):
            raise ValueError(f"state_bytes {sb!r} is neither 'param' nor a positive integer")
        q = e.get("quantized")
        quant = None if q is None else Quantized(int(q["bits"]), int(q["block"]), int(q["absmax_bytes"]),
                                                 int(q["min_size"]))
        opt = OptimizerDef(
            name=name, summary=str(e["summary"]), paged=bool(e.get("paged", False)), source=str(e["source"]),
            same_states_as=None if e.get("same_states_as") is None else str(e["same_states_as"]),
            states=int(e["states"]), state_bytes_per_element=None if sb == "param" else int(sb),
            scalar_bytes=int(e.get("scalar_bytes", 0)), factored=bool(e.get("factored", False)), quantized=quant,
            state_label=str(e.get("state_label", "")), label=str(e.get("label", name)),
            title=str(e.get("title", name)), searched=bool(e.get("searched", False)),
            trainer_names=tuple(str(x) for x in e.get("trainer_names", ())),
            trainer_notes={str(k): str(v) for k, v in dict(e.get("trainer_notes", {})).items()},
            loop_temp_states=int(e.get("loop_temp_states", 0)),
            largest_fp32_copies=int(e.get("largest_fp32_copies", 0)),
            stream_param_bytes=int(e["stream_param_bytes"]), stream_fixed_bytes=int(e.get("stream_fixed_bytes", 0)),
            loop_stream_factor=float(e.get("loop_stream_factor", 1.0)),
            bandwidth_efficiency=float(e["bandwidth_efficiency"]), cls=str(e["class"]),
            kwargs=dict(e.get("kwargs", {})), loop_kwargs=dict(e.get("loop_kwargs", {})),
            trainer_kwargs=dict(e.get("trainer_kwargs", {})), meta_trainer_class=str(e.get("meta_trainer_class", "")),
            cuda_class=str(e.get("cuda_class", "")), package=str(e.get("package", "")))
    except (KeyError, ValueError, TypeError) as exc:
        raise VramplanError(f"optimizers.toml: optimizer {name!r} is invalid ({exc})") from None
    if opt.states < 0 or not 0.0 < opt.bandwidth_efficiency <= 1.0 or ":" not in opt.cls:
        raise VramplanError(f"optimizers.toml: optimizer {name!r} has a negative state count, a bandwidth efficiency "
                            "outside (0, 1] or a class that is not 'module:Class'")
    if set(opt.trainer_notes) - set(opt.trainer_names):
        raise VramplanError(f"optimizers.toml: optimizer {name!r} has trainer_notes for names not in its trainer_names")
    if opt.paged and not opt.state_label:
        raise VramplanError(f"optimizers.toml: paged optimizer {name!r} needs a state_label")
    return opt


def _state_layout(opt: OptimizerDef) -> tuple:
    """What an optimiser's states are (count, bytes per element, per-tensor scalars, quantisation, factoring)."""
    return opt.states, opt.state_bytes_per_element, opt.scalar_bytes, opt.quantized, opt.factored


@lru_cache(maxsize=None)
def optimizers() -> dict[str, OptimizerDef]:
    """Every optimiser of ``vramplan/data/optimizers.toml``, validated (read once)."""
    out = {name: _parse(name, e) for name, e in load_data("optimizers.toml").items()}
    seen: dict[str, str] = {}
    for opt in out.values():
        if opt.same_states_as is not None:
            twin = out.get(opt.same_states_as)
            if twin is None or twin.same_states_as is not None or _state_layout(twin) != _state_layout(opt):
                raise VramplanError(f"optimizers.toml: {opt.name}'s same_states_as {opt.same_states_as!r} is not an "
                                    "optimiser with the same states (and none of its own same_states_as)")
        for tn in opt.trainer_names:
            if seen.setdefault(tn, opt.name) != opt.name:
                raise VramplanError(f"optimizers.toml: trainer name {tn!r} is given to {seen[tn]} and {opt.name}")
    if not any(opt.searched for opt in out.values()):
        raise VramplanError("optimizers.toml: no optimiser is searched (give one `searched = true`)")
    return out


def searched_optimizers() -> tuple[str, ...]:
    """The optimisers a search tries when none is fixed (``searched`` in optimizers.toml), in the catalogue's
    order: the preference among equally fast plans and the matrix's settings ladder."""
    return tuple(name for name, opt in optimizers().items() if opt.searched)


def update_cost(name: str, grad_bytes: int) -> float:
    """Seconds-per-byte-of-bandwidth cost of the update of one trainable parameter with ``grad_bytes``-byte
    gradients under a fused step: :meth:`OptimizerDef.update_bytes_per_param` over ``bandwidth_efficiency``
    (the per-parameter factor of :func:`vramplan.throughput`'s optimiser seconds); compares two optimisers' updates."""
    opt = get_optimizer(name)
    return opt.update_bytes_per_param(grad_bytes, loop=False) / opt.bandwidth_efficiency


OPTIMIZERS: dict[str, OptimizerDef] = optimizers()
DEFAULT_OPTIMIZER = "adamw"
#: the catalogue's names as written (already lower case with underscores): found without re-spelling them
_AS_WRITTEN: dict[str, OptimizerDef] = {k: v for k, v in OPTIMIZERS.items() if k == k.lower().replace("-", "_")}


def get_optimizer(name: str | OptimizerDef) -> OptimizerDef:
    """The catalogue's optimiser of ``name`` (case and ``-``/``_`` spelling free), or ``name`` itself if a definition."""
    if type(name) is str:
        opt = _AS_WRITTEN.get(name)
        if opt is not None:
            return opt
    elif isinstance(name, OptimizerDef):
        return name
    try:
        return OPTIMIZERS[name.lower().replace("-", "_")]
    except KeyError:
        raise unknown("optimizer", name, OPTIMIZERS) from None
