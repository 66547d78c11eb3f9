"""Precision regimes of the CLI contract (``--precision``).

Each regime fixes the storage dtype of every kind of tensor and whether autocast runs.
Dtype sizes are bytes per element.

* ``bf16``: bf16 weights trained without autocast -- a plain PyTorch loop over a model
  loaded in bf16. Gradients and torch AdamW states take the parameter dtype (bf16), so
  full training is 2 + 2 + 4 = 8 bytes/param. PEFT adapters stay fp32 as PEFT makes them
  (``autocast_adapter_dtype=True``). The loop's AdamW runs its default foreach kernel.
* ``bf16-mixed``: HF ``Trainer`` with ``bf16=True``: fp32 trainable weights (full
  training), or PEFT's fp32 adapters over a frozen base in its load dtype (bf16), under
  ``torch.autocast(bfloat16)``. Full training is 4 + 4 + 8 = 16 bytes/param before
  activations (plus autocast's cached bf16 weight copies while they are saved for
  backward). The Trainer's default optimiser is fused AdamW (torch >= 2.8).
* ``fp16-mixed``: as bf16-mixed with fp16 (loss scaling; works on cards without bf16).
* ``fp32``: everything fp32, no autocast (HF Trainer defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import unknown

FP32, BF16, FP16 = "float32", "bfloat16", "float16"
DTYPE_BYTES = {FP32: 4, BF16: 2, FP16: 2, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class Regime:
    name: str
    #: dtype of weights that train in full training
    trainable_dtype: str
    #: dtype of a frozen (non-quantised) base, i.e. the load dtype
    frozen_dtype: str
    #: dtype of PEFT adapter parameters
    adapter_dtype: str
    #: autocast dtype, or None
    autocast: str | None
    #: dtype in which activations are computed/saved
    compute_dtype: str
    #: "loop" (plain PyTorch loop: AdamW foreach) or "trainer" (HF Trainer: fused AdamW)
    runner: str
    summary: str

    @property
    def needs_bf16(self) -> bool:
        return BF16 in (self.trainable_dtype, self.frozen_dtype, self.compute_dtype)


REGIMES: dict[str, Regime] = {
    "bf16": Regime("bf16", BF16, BF16, FP32, None, BF16, "loop",
                   "bf16 weights, no autocast (plain loop); grads and AdamW states in bf16; PEFT adapters fp32"),
    "bf16-mixed": Regime("bf16-mixed", FP32, BF16, FP32, BF16, BF16, "trainer",
                         "HF Trainer bf16=True: fp32 trainable weights / fp32 adapters over a bf16 base, autocast bf16"),
    "fp16-mixed": Regime("fp16-mixed", FP32, FP16, FP32, FP16, FP16, "trainer",
                         "HF Trainer fp16=True: fp32 trainable weights / fp32 adapters over an fp16 base, autocast fp16"),
    "fp32": Regime("fp32", FP32, FP32, FP32, None, FP32, "trainer", "everything fp32, no autocast"),
}
DEFAULT_REGIME = "bf16-mixed"
FALLBACK_REGIME = "fp16-mixed"  # on cards without bf16, when the user did not ask for a regime


def get_regime(name: str | Regime) -> Regime:
    if isinstance(name, Regime):
        return name
    try:
        return REGIMES[name.lower()]
    except KeyError:
        err = unknown("precision", name, REGIMES)
        if name.lower() in ("fp16", "float16", "half", "f16"):  # pure fp16 training is not a regime anyone runs
            err.hint = "did you mean fp16-mixed (fp16 autocast over fp32 master weights)? valid: " + ", ".join(REGIMES)
        raise err from None
