"""Precision regimes of the CLI contract (``--precision``), as data.

Each regime (``vramplan/data/precisions.toml``, with its source) fixes the storage dtype of
every kind of tensor, whether autocast runs, the runner whose optimiser kernel applies and
whether the loss is scaled (``grad_scaler``). Dtype sizes are bytes per element.

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
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError, unknown

FP32, BF16, FP16 = "float32", "bfloat16", "float16"
DTYPE_BYTES = {FP32: 4, BF16: 2, FP16: 2, "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class Runner:
    """The training loop a regime (or a stack, stacks.toml ``runner``) runs under, by what it does; every layer reads
    these attributes (the optimiser's kernel, the outputs' dtype, clipping), never the runner's name."""

    name: str
    summary: str
    #: the optimiser's fused kernel (HF Trainer >= torch 2.8: ``adamw_torch_fused``); else the foreach kernel a
    #: plain loop's ``torch.optim.AdamW`` defaults to (its state-sized temporaries: optimizers.toml loop_*)
    fused_optimizer: bool
    #: the model's outputs (logits, hidden states) converted to fp32 after the forward (accelerate's
    #: ``convert_outputs_to_fp32``, which the Trainer's prepared model applies under mixed precision)
    fp32_outputs: bool
    #: ``clip_grad_norm_(max_norm=1.0)`` before the step (TrainingArguments ``max_grad_norm=1.0``)
    clips_gradients: bool


#: The runners a regime names (precisions.toml ``runner``).
RUNNERS: dict[str, Runner] = {r.name: r for r in (
    Runner("loop", "a plain PyTorch loop: torch.optim.AdamW's foreach kernel, outputs in the compute dtype",
           fused_optimizer=False, fp32_outputs=False, clips_gradients=False),
    Runner("trainer", "the HF Trainer: fused AdamW, outputs converted to fp32, gradients clipped at 1.0",
           fused_optimizer=True, fp32_outputs=True, clips_gradients=True),
)}


def get_runner(name: str) -> Runner:
    """The :class:`Runner` named ``name`` (a regime's or a stack's ``runner``)."""
    try:
        return RUNNERS[name]
    except KeyError:
        raise unknown("runner", name, RUNNERS) from None


@dataclass(frozen=True)
class Regime:
    """One precision regime as ``vramplan/data/precisions.toml`` declares it."""

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
    #: the loss is scaled by torch.amp.GradScaler (fp16-mixed)
    grad_scaler: bool = False
    source: str = ""

    @property
    def training_loop(self) -> Runner:
        """The :class:`Runner` of ``runner``."""
        return RUNNERS[self.runner]

    @property
    def needs_bf16(self) -> bool:
        return BF16 in (self.trainable_dtype, self.frozen_dtype, self.compute_dtype)


_DTYPES = (FP32, BF16, FP16)


def _parse(name: str, e: dict) -> Regime:
    try:
        autocast = str(e["autocast"])
        r = Regime(name=name, trainable_dtype=str(e["trainable_dtype"]), frozen_dtype=str(e["frozen_dtype"]),
                   adapter_dtype=str(e["adapter_dtype"]), autocast=None if autocast == "none" else autocast,
                   compute_dtype=str(e["compute_dtype"]), runner=str(e["runner"]), summary=str(e["summary"]),
                   grad_scaler=bool(e.get("grad_scaler", False)), source=str(e["source"]))
    except (KeyError, TypeError) as exc:
        raise VramplanError(f"precisions.toml: regime {name!r} is invalid (missing {exc})") from None
    dtypes = (r.trainable_dtype, r.frozen_dtype, r.adapter_dtype, r.compute_dtype, r.autocast or FP32)
    if any(d not in _DTYPES for d in dtypes) or r.runner not in RUNNERS:
        raise VramplanError(f"precisions.toml: regime {name!r} has a dtype outside {', '.join(_DTYPES)} or a runner "
                            f"outside {', '.join(RUNNERS)}")
    return r


@lru_cache(maxsize=None)
def regimes() -> dict[str, Regime]:
    """Every regime of ``vramplan/data/precisions.toml``, validated (read once)."""
    return {name: _parse(name, e) for name, e in load_data("precisions.toml").items()}


REGIMES: dict[str, Regime] = regimes()
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
