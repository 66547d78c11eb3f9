"""The preference family's shared behaviour (ORPO, CPO, SimPO, KTO, reward models) and its loss
buffers: numpy only, bytes as float arrays over the planning grid.

Each method is one small module of this package (``orpo``, ``cpo``, ``simpo``, ``kto``, ``reward``)
naming its torch step (:mod:`vramplan.runtime.preference`), its trainer-config names and its
assumption text, on top of :class:`Preference` here; the copies and sequences per example are
data in methods.toml.

Each function returns ``(forward, backward)`` peak bytes of the logits and the loss for
``tokens`` tokens through the policy's training forward (``rows`` sequences), in the shape of
:func:`vramplan.activations.logits_bytes`, so :func:`vramplan.memory.step_terms` places them
in the step like any other loss. The trainers they follow are TRL's at commit ``f2cd577``
(1.10.0.dev0) and the torch steps the dry run traces are :mod:`vramplan.runtime.preference`;
the byte counts per logit below are the dry run's (``benchmarks/dryrun_vs_analytic.py``), read
op by op:

* *fp32 logits* (HF Trainer regimes: accelerate converts the 16-bit output to fp32; or an fp32
  model). ``selective_log_softmax`` gathers and takes a per-row logsumexp of the fp32 logits:
  forward holds the fp32 logits (4 B per logit) and, while converting, the 16-bit output;
  backward holds 16 B per logit (the logits, the gather's scattered gradient, the rows' stacked
  gradient and their sum), as DPO's :func:`vramplan.activations.logits_bytes`.
* *16-bit logits* (a plain bf16 loop, no conversion): the logits and each row's saved
  ``log_softmax`` output (2 x the logits' dtype) in forward; two 16-bit gradients in backward.

On top of that:

* **NLL on the chosen half** (ORPO; CPO with ``cpo_alpha != 0``): ``nn.CrossEntropyLoss`` over
  ``logits[:n, :-1].contiguous()``: log_softmax's saved output of the chosen half (4 B per
  chosen logit in fp32; the logits' dtype with 16-bit logits) and, with more than one chosen
  row, the ``.contiguous()`` copy beside it in forward; one more gradient of the chosen half in
  backward. Chosen logits are half the concatenated batch's.
* **KTO's metrics** (``KTOTrainer._compute_loss``): while the reference's output (its logits, the
  policy's size) is alive, ``index_select`` copies of the chosen and the rejected rows (the whole
  shifted logits), then a boolean-mask copy of the chosen rows' tokens: forward holds
  ``logits x (3 + desirable fraction)`` beside the reference's (fp32), or the same in the
  logits' dtype plus the saved per-row log-softmax outputs (16-bit). With precomputed reference
  log-probs there is no reference output.
* **A trained scalar head** (reward models: ``AutoModelForSequenceClassification``): no
  vocabulary logits; the final RMSNorm's backward in fp32 holds five ``tokens x hidden`` fp32
  buffers beside every saved activation (the dry run), which is the backward peak when the
  layers' own backward buffers are smaller.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..precision import get_runner
from .base import Behaviour

#: the TRL release the preference trainers follow (github.com/huggingface/trl)
TRL = "TRL 1.10.0.dev0 (commit f2cd577)"
#: trl.trainer.utils.entropy_from_logits: rows per chunk, and the chunk's buffers (log_softmax, exp, product)
ENTROPY_CHUNK_ROWS = 128
ENTROPY_CHUNK_BUFFERS = 3

#: the final RMSNorm's fp32 backward: five tokens x hidden fp32 buffers alive at once (dry run)
NORM_BACKWARD_BUFFERS = 5


def _fp32_logits(logits_bytes: int, runner: str) -> bool:
    return logits_bytes == 4 or get_runner(runner).fp32_outputs


def paired_logits_bytes(T, V: int, logits_bytes: int, runner: str, rows, nll: bool):
    """ORPO / CPO / SimPO (one concatenated forward of chosen + rejected, no reference):
    ``(forward, backward)`` bytes of the logits and the loss over ``T`` tokens of ``rows`` rows.

    ``logits_bytes``: the dtype size of the model's output logits; ``runner``: the regime's
    runner (``trainer`` converts the output to fp32); ``nll``: the chosen half's cross-entropy.
    """
    T = np.asarray(T, dtype=np.float64)
    L = T * V
    r = np.maximum(np.asarray(rows, dtype=np.float64), 1.0)
    multi = np.where(r / 2 > 1, 1.0, 0.0)  # more than one chosen row: .contiguous() copies
    if _fp32_logits(logits_bytes, runner):
        out16 = float(logits_bytes) if logits_bytes != 4 else 0.0
        fwd = L * (4.0 + out16)
        bwd = L * 16.0
        if nll:
            # the chosen half (L/2): log_softmax's fp32 output saved, the contiguous copy beside it
            fwd = np.maximum(fwd, L * 4.0 + (L / 2) * 4.0 * (1.0 + multi))
            bwd = bwd + (L / 2) * 4.0
        return fwd, bwd
    d = float(logits_bytes)
    fwd, bwd = L * 2 * d, L * 2 * d
    if nll:
        fwd, bwd = fwd + (L / 2) * d, bwd + (L / 2) * 2 * d
    return fwd, bwd


def kto_logits_bytes(T, V: int, logits_bytes: int, runner: str, batch, reference: bool):
    """KTO over ``T`` tokens of ``batch`` unpaired sequences (the first ``ceil(batch / 2)``
    desirable): ``(forward, backward)`` bytes of the logits, the reference's output (unless
    ``reference`` is False: precomputed log-probs) and the metrics' copies."""
    T = np.asarray(T, dtype=np.float64)
    L = T * V
    b = np.maximum(np.asarray(batch, dtype=np.float64), 1.0)
    frac = np.ceil(b / 2) / b  # desirable share of the batch: the boolean-mask copy's size
    ref = 1.0 if reference else 0.0
    # entropy_from_logits first: the reshaped copy and one chunk's three buffers (128 rows)
    chunk = ENTROPY_CHUNK_BUFFERS * np.minimum(ENTROPY_CHUNK_ROWS, T) * V
    if _fp32_logits(logits_bytes, runner):
        entropy = L * (4.0 + 4.0 * ref + 4.0) + chunk * 4.0
        return np.maximum(L * (4.0 + 4.0 * ref + 4.0 + 4.0 * frac), entropy), L * 16.0
    d = float(logits_bytes)
    entropy = L * d * (2.0 + ref + 1.0) + chunk * d
    return np.maximum(L * d * (3.0 + ref + frac), entropy), L * 2 * d


def scalar_head_backward_bytes(T, hidden: int):
    """A trained scalar head (reward model): the final RMSNorm's fp32 backward buffers (bytes)."""
    return np.asarray(T, dtype=np.float64) * hidden * 4.0 * NORM_BACKWARD_BUFFERS


def precompute_pass_bytes(model: Any, cfg: Any) -> float:
    """TRL's ``precompute_ref_log_probs`` pass (DPO and KTO ``train()`` -> ``_precompute_ref_logps``: a
    DataLoader over the training set at ``per_device_train_batch_size``, TRL f2cd577), in tensor bytes above
    the loaded model: before the first step no gradient or optimiser state exists yet; the reference
    (the policy's base with its adapter disabled under PEFT, else the model itself: ``ref_model`` is None)
    runs a no-grad forward of one batch's sequences -- one layer's working set and the logits with the
    loss's forward buffers, as the reference's forward in the step of the method without precomputing."""
    from .. import activations as act
    from ..memory import attention_as_run
    from . import Forward, ModelCopy, Role

    cfg = attention_as_run(model, cfg)
    model = cfg.stack.as_built(model)
    pol = cfg.recipe.copies[0]
    ref = ModelCopy(role=Role.REFERENCE, adapter=None, quantized=pol.quantized, head=pol.head, forward=Forward.NO_GRAD)
    rows = cfg.batch * cfg.recipe.sequences_per_example
    T, s = rows * cfg.seq, cfg.seq
    f, _ = act.logits_bytes(model, ref, cfg.regime, T, ref.head, cfg, rows)
    work = act.layer_activation_bytes(model, cfg, ref, cfg.regime, T, s) + act.eager_attention_work(
        model, cfg, ref, cfg.regime, T, s)[0]
    return float(np.max(f + work))


class Preference(Behaviour):
    """A preference method as TRL runs it; subclasses set :attr:`loss_kind` and their names.

    ``loss_kind``: ``"paired"`` (ORPO / CPO / SimPO: chosen + rejected concatenated, no reference),
    ``"kto"`` (unpaired, reference and KL forwards) or ``"scalar"`` (a reward model's score head).
    ``nll``: the chosen half's cross-entropy term (ORPO; CPO with ``cpo_alpha != 0``).
    """

    takes_adapter_choice = True
    loss_kind = "paired"
    nll = False
    #: a reference's forward in the step (KTO without precomputed reference log-probs)
    reference = False

    def loss_bytes(self, model: Any, copy: Any, regime: Any, tokens: Any, rows: Any, cfg: Any,
                   logits_dtype_bytes: int):
        V = model.vocab_size
        if self.loss_kind == "scalar":
            T = np.asarray(tokens, dtype=np.float64)
            return T * 8.0, np.maximum(T * 8.0, scalar_head_backward_bytes(T, model.hidden_size))
        if self.loss_kind == "kto":
            return kto_logits_bytes(tokens, V, logits_dtype_bytes, regime.runner, rows, self.reference)
        return paired_logits_bytes(tokens, V, logits_dtype_bytes, regime.runner, rows, self.nll)

    def dryrun_assumptions(self, cfg: Any) -> list[str]:
        return [f"{cfg.method.upper()} as {TRL}: the loss mask taken as the whole sequence (no prompt tokens "
                "masked), so every loss buffer has its full size"]
