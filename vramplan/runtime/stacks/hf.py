"""The Hugging Face stack (``--framework hf``): transformers + PEFT, as the HF Trainer, TRL and Axolotl build it.

Every model copy of the method (:mod:`vramplan.methods`) is built by
:func:`vramplan.runtime.build.build_copy` (``AutoModelForCausalLM.from_config`` in the regime's
dtype, PEFT's adapters, QLoRA's NF4 layers, gradient checkpointing as the Trainer enables it),
one optimiser holds every trainable copy (:func:`~vramplan.runtime.build.make_optimizer`), a
``GradScaler`` scales the loss where the regime says so (``regime.grad_scaler``), and the
method's own step runs (``t.run`` stays None: :func:`vramplan.runtime.steps.run_step`).
The regime is the one named (``--precision``): the HF Trainer and a plain loop are the regime's
own runners.
"""

from __future__ import annotations

import torch

from ...precision import get_regime
from ..build import attn_impl, build_copy, make_optimizer
from ..emulation import patch_meta_autocast
from . import StackRuntime


class HfRuntime(StackRuntime):
    name = "hf"

    def regime(self, cfg):
        return get_regime(cfg.precision)

    def check(self, spec, cfg) -> None:
        if cfg.recipe.adapter.quantized_base:
            from ...errors import require

            require("bitsandbytes", "calibrate")

    def build(self, t) -> None:
        attn = attn_impl(t.cfg, t.device, t.fake, t.notes, t.spec)
        for copy in t.recipe.copies:
            t.copies[copy.role] = build_copy(t, copy, attn)
        if t.fake:
            patch_meta_autocast()  # (the modeling modules are imported by now)
        # the output heads open the logits sections (attribution only)
        for c in t.copies.values():
            head = c.inner.get_output_embeddings() if c.spec.head == "lm" else getattr(c.inner, "score", None)
            if head is not None:
                head.register_forward_pre_hook(t._head_pre_hook)
                head.register_forward_hook(t._head_post_hook)
        t.optimizer = make_optimizer(t.trainable_parameters(), t.cfg, t.regime, t.device, t.fake, t.notes)
        if t.regime.grad_scaler and not t.fake:
            t.scaler = torch.amp.GradScaler(t.device.split(":")[0])


RUNTIME = HfRuntime()
