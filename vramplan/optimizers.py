"""Optimiser state memory (``--optimizer``).

State bytes are computed per trainable tensor, since 8-bit optimisers keep small
tensors in 32-bit and Adafactor factors only matrices.

Sources:
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

from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import unknown

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes Optimizer2State default
BNB_BLOCK = 256  # bitsandbytes blockwise 8-bit optimiser block size


@dataclass(frozen=True)
class OptimizerDef:
    name: str
    summary: str
    paged: bool = False

    def state_bytes(self, shape: Sequence[int], param_bytes: int) -> int:
        """Bytes of optimiser state for one tensor of ``shape`` whose parameter has ``param_bytes`` per element."""
        numel = 1
        for d in shape:
            numel *= int(d)
        if self.name == "adamw":
            return 2 * numel * param_bytes + 4  # exp_avg, exp_avg_sq, step (fp32 scalar)
        if self.name in ("adamw_8bit", "paged_adamw_8bit"):
            if numel < BNB_MIN_8BIT_SIZE:
                return 2 * numel * 4 + 4
            blocks = -(-numel // BNB_BLOCK)
            return 2 * numel + 2 * blocks * 4 + 4
        if self.name == "paged_adamw_32bit":
            return 2 * numel * 4 + 4  # fp32 state1, state2 (bitsandbytes optim_bits=32), step
        if self.name == "sgd":
            return 0
        if self.name == "adafactor":
            if len(shape) >= 2:
                rows = numel // int(shape[-1])
                cols = numel // int(shape[-2])
                return (rows + cols) * param_bytes + 4
            return numel * param_bytes + 4
        raise AssertionError(self.name)

    def total_state_bytes(self, tensors: Iterable[tuple[tuple[int, ...], int, int]]) -> int:
        """Sum :meth:`state_bytes` over ``(shape, count, param_bytes)`` groups."""
        return sum(count * self.state_bytes(shape, pbytes) for shape, count, pbytes in tensors)

    def step_temporary_bytes(self, tensors: list[tuple[tuple[int, ...], int, int]], runner: str) -> int:
        """Transient bytes allocated inside ``optimizer.step()``.

        AdamW foreach (a plain loop on CUDA): one ``exp_avg_sq``-sized temporary per dtype
        group. Fused AdamW, bitsandbytes and SGD: none. Adafactor: an fp32 update of the
        largest tensor plus fp32 copies of a 16-bit parameter and gradient.
        """
        if self.name == "adamw" and runner == "loop":
            return sum(count * _numel(shape) * pbytes for shape, count, pbytes in tensors)
        if self.name == "adafactor" and tensors:
            largest = max(_numel(shape) for shape, _c, _b in tensors)
            return largest * 4 * 3
        return 0


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


OPTIMIZERS: dict[str, OptimizerDef] = {
    "adamw": OptimizerDef("adamw", "torch AdamW: two states in the parameter dtype"),
    "adamw_8bit": OptimizerDef("adamw_8bit", "bitsandbytes AdamW8bit: blockwise 8-bit states"),
    "paged_adamw_8bit": OptimizerDef("paged_adamw_8bit", "bitsandbytes PagedAdamW8bit: 8-bit states in paged unified memory", paged=True),
    "paged_adamw_32bit": OptimizerDef("paged_adamw_32bit", "bitsandbytes PagedAdamW32bit: two fp32 states in paged "
                                      "unified memory", paged=True),
    "sgd": OptimizerDef("sgd", "torch SGD, no momentum: no state"),
    "adafactor": OptimizerDef("adafactor", "transformers Adafactor: factored second moments, no first moment"),
}
DEFAULT_OPTIMIZER = "adamw"


def get_optimizer(name: str | OptimizerDef) -> OptimizerDef:
    if isinstance(name, OptimizerDef):
        return name
    try:
        return OPTIMIZERS[name.lower().replace("-", "_")]
    except KeyError:
        raise unknown("optimizer", name, OPTIMIZERS) from None
