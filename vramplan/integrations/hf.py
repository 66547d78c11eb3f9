"""A ``transformers`` ``TrainerCallback`` that plans the run it is attached to.

Use with ``Trainer`` or any TRL trainer (they subclass it)::

    from vramplan import VramplanCallback
    trainer = SFTTrainer(..., callbacks=[VramplanCallback(gpu="rtx3080")])

At ``on_train_begin`` it plans the run from the live model, its PEFT adapter and the
training arguments (:func:`vramplan.integrations.from_model.request_from_model`), logs the
prediction with its verdict (:mod:`vramplan.verdict`) and, when the run will not fit,
warns with what to change (``VramplanWarning``; ``stop_if_no_fit=True`` also stops
training). It records the shape of the first training batch with a forward pre-hook, and
after ``measure_at_step`` optimizer steps (default 2: the steady state, optimizer states
allocated) compares the prediction, re-planned at that shape, with the measured peak:
``torch.cuda.max_memory_allocated`` against the tensor peak and, where NVML is available,
the process's device memory against the device total. ``calibration_log=PATH`` appends
the point to a user calibration log (JSONL, :mod:`vramplan.calibration.log`).

Measurement needs CUDA; on a CPU the callback still plans and warns, and logs that no
measurement is available. ``measure=`` replaces the measurement (a callable returning a
dict of bytes), for other devices and for tests.

This module imports transformers; ``import vramplan`` does not import it.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..errors import VramplanError, require
from ..methods import Adapter
from ..optimizers import get_optimizer, optimizers
from ..units import GIB
from ..verdict import Verdict, classify
from .request import PlanRequest

transformers = require("transformers", "integrations")

logger = logging.getLogger("vramplan")


class VramplanWarning(UserWarning):
    """The planner predicts that this training run does not fit its GPU."""


@dataclass
class Comparison:
    """Predicted vs measured peak memory after ``step`` steps (bytes; None when not measured)."""

    step: int
    batch: int
    seq: int
    predicted_tensor_peak_bytes: int
    predicted_peak_bytes: int
    measured_allocated_bytes: int | None = None
    measured_reserved_bytes: int | None = None
    measured_process_bytes: int | None = None
    measured: dict = field(default_factory=dict)

    @property
    def tensor_ratio(self) -> float | None:
        """predicted / measured tensor peak (1.0 = exact; > 1 over-predicts)."""
        m = self.measured_allocated_bytes
        return None if not m else self.predicted_tensor_peak_bytes / m

    @property
    def device_ratio(self) -> float | None:
        m = self.measured_process_bytes
        return None if not m else self.predicted_peak_bytes / m

    def message(self) -> str:
        head = (f"vramplan: after step {self.step} (batch {self.batch} x seq {self.seq}): predicted tensor peak "
                f"{self.predicted_tensor_peak_bytes / GIB:.3f} GiB, device total {self.predicted_peak_bytes / GIB:.3f} GiB")
        if self.measured_allocated_bytes is None:
            return head + "; measured: not available (no CUDA device)"
        out = (f"{head}; measured max_memory_allocated {self.measured_allocated_bytes / GIB:.3f} GiB "
               f"(predicted/measured {self.tensor_ratio:.3f})")
        if self.measured_reserved_bytes is not None:
            out += f", reserved {self.measured_reserved_bytes / GIB:.3f} GiB"
        if self.measured_process_bytes is not None:
            out += (f", process device total {self.measured_process_bytes / GIB:.3f} GiB "
                    f"(predicted/measured {self.device_ratio:.3f})")
        return out


def _cuda_measure() -> dict | None:
    """Peak memory of this process on the current CUDA device, or None without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    dev = torch.cuda.current_device()
    out = {"max_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
           "max_reserved_bytes": int(torch.cuda.max_memory_reserved(dev))}
    try:
        from ..nvml import process_used_bytes

        out["process_bytes"] = process_used_bytes(dev)
    except VramplanError:
        out["process_bytes"] = None
    return out


def _detect_card():
    """The local card: NVML first, then torch.cuda's name and total memory; None without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return None
    if not torch.cuda.is_available():
        return None
    from ..gpus import custom_gpu, detect_gpu, get_gpu

    try:
        return detect_gpu(torch.cuda.current_device())
    except VramplanError:
        pass
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    try:
        return replace(get_gpu(props.name), memory_bytes=int(props.total_memory))
    except VramplanError:
        return replace(custom_gpu(int(props.total_memory)), display_name=props.name)


def _has_handler(log: logging.Logger) -> bool:
    """A handler on ``log`` or an ancestor that propagates (``logging.lastResort`` does not count)."""
    node: logging.Logger | None = log
    while node is not None:
        if node.handlers:
            return True
        node = node.parent if node.propagate else None
    return False



def _full_size_states(optimizer: str) -> bool:
    """Whether ``optimizer`` keeps full-size states resident on the card (AdamW: two, neither 8-bit, paged nor
    factored), so an 8-bit optimizer is the advice."""
    opt = get_optimizer(optimizer)
    return opt.states >= 2 and opt.quantized is None and not opt.paged and not opt.factored

class VramplanCallback(transformers.TrainerCallback):
    """Plan the run at train begin; warn if it will not fit; compare with the measured peak.

    Args:
        gpu: catalogue name or GPUSpec to plan for; default: the local CUDA card (NVML or
            torch), none on a CPU (then no verdict, only the predicted peak).
        gpu_mem: plan for a capacity instead (``"24GiB"``).
        measure_at_step: the global step after which to measure (default 2, steady state).
        calibration_log: path of a JSONL log to append the measured point to.
        stop_if_no_fit: also set ``control.should_training_stop`` when the verdict is "no".
        measure: ``() -> dict | None`` replacing the CUDA measurement; keys
            ``max_allocated_bytes``, ``max_reserved_bytes``, ``process_bytes``.
        **overrides: planning options that win over what was read (``seq=4096``, ``method="dpo"``).

    After training: ``estimate`` (the plan), ``verdict``, ``comparison`` (a
    :class:`Comparison`), ``messages`` (everything logged).
    """

    def __init__(self, gpu: Any = None, *, gpu_mem: Any = None, measure_at_step: int = 2,
                 calibration_log: str | None = None, stop_if_no_fit: bool = False,
                 measure: Callable[[], dict | None] | None = None, **overrides):
        if not isinstance(measure_at_step, int) or measure_at_step < 1:
            raise VramplanError(f"measure_at_step must be a positive integer, got {measure_at_step!r}")
        self.gpu = gpu
        self.gpu_mem = gpu_mem
        self.measure_at_step = measure_at_step
        self.calibration_log = calibration_log
        self.stop_if_no_fit = stop_if_no_fit
        self.measure = measure or _cuda_measure
        self.overrides = overrides
        self.request: PlanRequest | None = None
        self.estimate = None
        self.verdict: Verdict | None = None
        self.comparison: Comparison | None = None
        self.messages: list[str] = []
        self._card = None
        self._shape: tuple[int, int] | None = None
        self._hook = None

    # -- helpers -----------------------------------------------------------------------
    def _say(self, text: str, level: int = logging.INFO) -> None:
        """Keep ``text`` in ``messages`` and show it where a default ``Trainer`` run's user sees it.

        Through the ``vramplan`` logger when it emits at ``level`` (a configured handler, or a
        warning, which Python's last-resort handler prints); otherwise an INFO line would vanish
        (the root logger's default level is WARNING, transformers logs through its own), so it is
        printed on stderr, once, from the main process only (``state.is_world_process_zero``).
        """
        self.messages.append(text)
        if level >= logging.WARNING or (logger.isEnabledFor(level) and _has_handler(logger)):
            logger.log(level, text)
        elif getattr(self, "_main_process", True):
            print(text, file=sys.stderr, flush=True)

    def _plan(self, **extra):
        from .from_model import SEQ_NOTE

        over = {**self.overrides, **extra}
        req = self.request
        if over.get("seq") is not None:
            req = replace(req, notes=[n for n in req.notes if not n.startswith(SEQ_NOTE)])
        return req.with_overrides(**over).estimate(gpu=self._card, gpu_mem=self.gpu_mem)

    def _advice(self) -> str:
        """What would make it fit, from the planner (largest batch, memory savers). The batch is ``fit``'s:
        the largest the verdict calls comfortable (:func:`vramplan.planner.limits.band_limits`, the stack and
        method's band and the margin), else the largest that may fit, said so."""
        from ..planner.limits import band_limits

        est, cfg = self.estimate, self.estimate.config
        tips = []
        card = self._card_spec()
        if card is not None:
            lim = band_limits(self.request.model, cfg, card)
            nb = lim.max_batch or lim.max_batch_tight
            if 0 < nb < cfg.batch:
                tight = "" if lim.max_batch else ", tight: may fit"
                tips.append(f"per_device_train_batch_size={nb} (gradient_accumulation_steps to keep the global "
                            f"batch{tight})")
        if not cfg.grad_ckpt:
            tips.append("gradient_checkpointing=True")
        if _full_size_states(cfg.optimizer):
            eight = [o.trainer_names[0] for o in optimizers().values() if o.quantized is not None and o.trainer_names]
            tips.append("optim=" + " or ".join(f'"{n}"' for n in eight))
        adapter = Adapter(est.adapter)
        if adapter is Adapter.FULL:
            tips.append("LoRA or QLoRA instead of full training")
        elif adapter.low_rank and not adapter.quantized_base:
            tips.append("a 4-bit base (QLoRA)")
        tips.append(f"`vramplan fit --model <config.json> --gpu {card.name if card else 'NAME'}` for every option")
        return "; ".join(tips)

    def _card_spec(self):
        """The card planned for: the given or detected one, its capacity replaced by ``gpu_mem``."""
        if self.gpu_mem is None:
            return self._card
        from ..plan import resolve_gpu

        return resolve_gpu(self._card, self.gpu_mem)

    # -- events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._main_process = bool(getattr(state, "is_world_process_zero", True))
        if model is None:
            return control
        from .from_model import request_from_model

        try:
            from ..gpus import get_gpu

            self._card = get_gpu(self.gpu) if self.gpu is not None else _detect_card()
            self.request = request_from_model(model, None, args, method=self.overrides.get("method"))
            self.estimate = self._plan()
        except VramplanError as exc:
            self._say(f"vramplan: cannot plan this run: {exc}", logging.WARNING)
            self.request = None
            return control
        from .from_model import SEQ_NOTE

        est, cfg = self.estimate, self.estimate.config
        assumed = " (assumed: not in the arguments; pass VramplanCallback(seq=...))" if any(
            a.startswith(SEQ_NOTE) for a in est.assumptions) else ""
        what = (f"{est.model} {est.method}" + (f"+{est.adapter}" if est.adapter != est.method else "")
                + f", micro-batch {cfg.batch} x seq {cfg.seq}{assumed}, {cfg.precision}, "
                f"GC {'on' if cfg.grad_ckpt else 'off'}, {cfg.optimizer}")
        if est.capacity_bytes is None:
            self._say(f"vramplan: {what}: predicted peak {est.peak_gib:.2f} GiB device total "
                      f"({est.tensor_peak_bytes / GIB:.2f} GiB tensors); no GPU to compare with")
        else:
            from ..bands import band_for_estimate

            band = band_for_estimate(est)
            self.verdict = classify(est.peak_bytes, est.capacity_bytes, band.hi, band.lo)
            text = (f"vramplan: {what}: predicted peak {est.peak_gib:.2f} GiB of {est.capacity_bytes / GIB:.2f} GiB "
                    f"on {est.gpu}: {self.verdict.value}")
            if self.verdict is Verdict.TIGHT and est.peak_bytes > est.capacity_bytes:
                # over the card by less than the band's lower end: it may fit; say so, never stop the run
                from ..verdict import advice

                text = f"vramplan: {what}: " + advice(est.peak_bytes, est.capacity_bytes, band.hi, band.lo)
                self._say(text, logging.WARNING)
            elif self.verdict is Verdict.NO:
                text = (f"vramplan: this run will not fit: {what} needs about {est.peak_gib:.2f} GiB at its peak "
                        f"({est.peak_phase.value}) but {est.gpu} has {est.capacity_bytes / GIB:.2f} GiB. "
                        f"Try: {self._advice()}")
                self._say(text, logging.WARNING)
                warnings.warn(text, VramplanWarning, stacklevel=2)
                if self.stop_if_no_fit:
                    control.should_training_stop = True
            else:
                self._say(text)
        self._install_hook(model)
        self._reset_peaks()
        return control

    def _install_hook(self, model) -> None:
        def hook(module, args, kwargs):
            if self._shape is None and module.training:
                x = kwargs.get("input_ids")
                if x is None:
                    x = kwargs.get("inputs_embeds")
                if x is None and args:
                    x = args[0]
                shape = getattr(x, "shape", None)
                if shape is not None and len(shape) >= 2:
                    self._shape = (int(shape[0]), int(shape[1]))
            return None

        try:
            self._hook = model.register_forward_pre_hook(hook, with_kwargs=True)
        except (AttributeError, TypeError):  # pragma: no cover - not a torch module
            self._hook = None

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @staticmethod
    def _reset_peaks() -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        except ImportError:  # pragma: no cover
            pass

    def on_step_end(self, args, state, control, **kwargs):
        if self.request is None or self.comparison is not None or state.global_step < self.measure_at_step:
            return control
        self._remove_hook()
        est = self.estimate
        extra = {}
        if self._shape is not None:
            rows, seq = self._shape
            spe = est.config.recipe.sequences_per_example
            batch = max(1, rows // spe) if rows % spe == 0 else rows
            extra = {"batch": batch, "seq": seq}
            if (batch, seq) != (est.config.batch, est.config.seq):
                try:
                    est = self._plan(**extra)
                except VramplanError as exc:
                    self._say(f"vramplan: cannot re-plan at the observed shape {rows}x{seq}: {exc}", logging.WARNING)
        measured = self.measure()
        cmp = Comparison(step=int(state.global_step), batch=est.config.batch, seq=est.config.seq,
                         predicted_tensor_peak_bytes=int(est.tensor_peak_bytes), predicted_peak_bytes=int(est.peak_bytes))
        if measured:
            cmp.measured = dict(measured)
            cmp.measured_allocated_bytes = measured.get("max_allocated_bytes")
            cmp.measured_reserved_bytes = measured.get("max_reserved_bytes")
            cmp.measured_process_bytes = measured.get("process_bytes")
        self.comparison = cmp
        self.measured_estimate = est
        self._say(cmp.message())
        if self.calibration_log and measured:
            self._append_point(est, cmp, args)
        elif self.calibration_log:
            self._say("vramplan: nothing measured; calibration log not written")
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()
        return control

    def _append_point(self, est, cmp: Comparison, args) -> None:
        from ..calibration.log import JsonlLog
        from ..calibration.suite import point_id

        spec = self.request.model
        device = {}
        card = self._card_spec()
        if card is not None:
            device = {"name": card.display_name, "catalogue": card.name, "total_bytes": card.memory_bytes}
        versions = {}
        for mod in ("torch", "transformers", "peft", "bitsandbytes", "trl"):
            try:
                versions[mod] = __import__(mod).__version__
            except Exception:  # pragma: no cover - not installed, or fails to load on this machine
                pass
        # The runner's field names (``memory.max_allocated`` ...), so the calibration fit reads the
        # point as it reads the runner's; ``record`` is the same point as vramplan.measurements records.
        m = cmp.measured or {}
        memory = {"max_allocated": m.get("max_allocated_bytes"), "max_reserved": m.get("max_reserved_bytes"),
                  "nvml_process_bytes": m.get("process_bytes")}
        record = {
            "kind": "point", "split": "fit", "status": "ok", "source": "VramplanCallback",
            "id": point_id(spec.name, spec, est.config), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": spec.name, "model_config": spec.hf_config or None, "method": est.config.recipe.name,
            "config": est.config.to_dict(), "gpu": est.gpu, "device": device, "versions": versions,
            "gpus": int(getattr(est, "gpus", 1) or 1), "strategy": getattr(est, "strategy", None),
            "step": cmp.step, "memory": {k: int(v) for k, v in memory.items() if v is not None},
            "tokens_per_step": int(est.config.batch * est.config.seq),
            "predicted": {"tensor_peak_bytes": cmp.predicted_tensor_peak_bytes, "peak_bytes": cmp.predicted_peak_bytes},
        }
        from ..measurements.record import from_callback_point

        record["records"] = [r.to_dict() for r in from_callback_point(record)]
        try:
            with JsonlLog(self.calibration_log) as log:
                log.append(record)
        except OSError as exc:
            self._say(f"vramplan: cannot append to {self.calibration_log}: {exc}", logging.WARNING)
            return
        self._say(f"vramplan: appended the measured point to {self.calibration_log}")
