"""Real training steps of the reference-free and unpaired preference methods, and reward models.

Each follows one TRL trainer at commit ``f2cd57710ae345ea6428ae95363267fcf38a3dc8`` of
github.com/huggingface/trl (version 1.10.0.dev0), in plain torch + transformers (TRL is not
needed: the dry run runs these on ``meta``). The conventions are :mod:`vramplan.runtime.steps`'
(full-length sequences without padding, labels the input ids, ``use_cache=False``, the
regime's autocast around the model's forward, accelerate's fp32 conversion of its outputs under
the HF Trainer regimes, ``cfg.grad_accum`` micro-batches then the optimiser step); the loss mask
is taken as the whole sequence (no prompt tokens masked), so every buffer has its full size.

* ORPO (``trl/experimental/orpo/orpo_trainer.py``, ``ORPOTrainer.concatenated_forward`` and
  ``odds_ratio_loss``): chosen + rejected concatenated into one batch of ``2*batch``; the chosen
  half's NLL by ``nn.CrossEntropyLoss`` over ``logits[..., :-1, :].contiguous()`` (a copy of
  the chosen logits when the half has more than one row); the length-averaged log-probs of
  every row by ``selective_log_softmax`` over ``logits[:, :-1, :]``; the odds-ratio term in fp32
  (``.float()``) on per-sequence values; the logits metrics are ``.detach().mean()`` (no copy).
  No reference model.
* CPO / SimPO (``trl/experimental/cpo/cpo_trainer.py``): the same forward; the NLL term only when
  ``cpo_alpha != 0`` (CPO's default 1.0; SimPO is ``loss_type="simpo"`` with ``cpo_alpha=0``, TRL's
  docs/source/cpo_trainer.md); length-averaged log-probs for SimPO, summed for CPO's sigmoid loss.
* KTO (``trl/trainer/kto_trainer.py``, ``KTOTrainer._compute_loss``; the stable API since TRL 1.x,
  ``trl.experimental.kto`` only re-exports it): unpaired ``batch`` sequences, the first half
  desirable; with ``loss_type="kto"`` (the default) the KL estimate runs the policy on ``batch``
  mismatched (prompt, completion) sequences under ``no_grad`` *before* the training forward;
  then the policy's forward with grad; then, unless the reference log-probs are precomputed,
  under ``no_grad`` the reference's KL forward and its forward over the batch (adapter disabled
  under PEFT, else the frozen reference copy), its output alive to the end of the loss; then
  the metrics: ``entropy_from_logits`` (``reshape`` of the shifted logits: a copy when the batch
  has more than one row, then 128-row chunks) and the mean chosen/rejected logits
  (``index_select`` copies of the chosen and rejected rows, then a boolean-mask copy of each).
* Reward model (``trl/trainer/reward_trainer.py``, ``RewardTrainer.compute_loss``): a
  sequence-classification model (``AutoModelForSequenceClassification``, ``num_labels=1``: the
  base without its LM head plus a ``score`` linear over every token, pooled at the last non-pad
  token) over chosen + rejected concatenated (``2*batch`` rows);
  ``-logsigmoid(r_chosen - r_rejected).mean()``.
* DPO with ``precompute_ref_log_probs=True`` (``trl/trainer/dpo_trainer.py``, ``_compute_loss``):
  the reference log-probs come with the batch, so the step runs no reference forward and holds
  no reference model; otherwise as :func:`vramplan.runtime.steps` DPO step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods import Role
from .steps import Accumulation, dpo_step, entropy_from_logits, trainer_logits
from .steps import random_ids as _ids
from .steps import reference_model as _reference_model
from .steps import selective_log_softmax

BETA = 0.1          # ORPOConfig.beta, CPOConfig.beta, KTOConfig.beta
SIMPO_GAMMA = 0.5   # CPOConfig.simpo_gamma


def _logits(t, model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits as the Trainer returns them (:func:`~vramplan.runtime.steps.trainer_logits`)."""
    return trainer_logits(t, model, input_ids=ids)


def _batch_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    """TRL ORPO/CPO ``get_batch_logps``: log-probs of ``labels[:, 1:]`` under ``logits[:, :-1]``, summed or
    averaged over the loss mask (every token here)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels = torch.where(labels == -100, 0, labels)
    per_token = selective_log_softmax(logits, labels)
    if average:
        return (per_token * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token * loss_mask).sum(-1)


def _chosen_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL ORPO/CPO ``cross_entropy_loss`` on the chosen half: shift, ``.contiguous()``, flatten, CE."""
    logits = logits[..., :-1, :].contiguous()
    labels = labels[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """TRL ORPO ``log1mexp``: ``log(1 - exp(x))`` for ``x < 0``, stably."""
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _paired(t, *, nll: bool, average: bool, loss: str, metric_drops_last: bool) -> dict:
    """ORPO / CPO / SimPO: one concatenated forward of chosen + rejected, no reference model."""
    cfg = t.cfg
    ga = cfg.grad_accum
    n = cfg.batch
    acc = Accumulation(t)
    for _ in acc:
        ids = _ids(t, 2 * n, cfg.seq)  # chosen then rejected, concatenated
        labels = ids.clone()
        all_logits = _logits(t, t.policy, ids)
        nll_loss = _chosen_nll(all_logits[:n], labels[:n]) if nll else None
        all_logps = _batch_logps(all_logits, labels, average)
        chosen, rejected = all_logps[:n].float(), all_logps[n:].float()
        if loss == "orpo":  # odds_ratio_loss: loss = nll - beta * logsigmoid(log odds)
            log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
            pref = -BETA * F.logsigmoid(log_odds)
        elif loss == "simpo":  # cpo_loss, loss_type="simpo"
            pref = -F.logsigmoid(BETA * ((chosen - rejected) - SIMPO_GAMMA / BETA))
        else:  # cpo_loss, loss_type="sigmoid"
            pref = -F.logsigmoid(BETA * (chosen - rejected))
        total = pref.mean() + (nll_loss if nll_loss is not None else 0.0)
        # metrics: logits/chosen and logits/rejected, detached means (ORPO drops the last position: a view)
        stop = -1 if metric_drops_last else None
        _m = (all_logits[:n, :stop].detach().mean(), all_logits[n:, :stop].detach().mean())
        del _m, all_logps, chosen, rejected, pref, nll_loss, ids, labels
        loss_ = [total / ga]  # owned by _backward, which empties it
        del total
        t.logits_done()
        del all_logits
        acc.backward(loss_)
    return acc.update()


def orpo_step(t) -> dict:
    """ORPO (TRL ``ORPOTrainer``): NLL of the chosen half + the odds-ratio term, length-averaged log-probs."""
    return _paired(t, nll=True, average=True, loss="orpo", metric_drops_last=True)


def cpo_step(t) -> dict:
    """CPO (TRL ``CPOTrainer`` defaults: sigmoid loss, ``cpo_alpha=1``): NLL of the chosen half + the
    sigmoid preference loss on summed log-probs."""
    return _paired(t, nll=True, average=False, loss="sigmoid", metric_drops_last=False)


def simpo_step(t) -> dict:
    """SimPO (TRL ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``): length-averaged log-probs, a
    target margin, no NLL term."""
    return _paired(t, nll=False, average=True, loss="simpo", metric_drops_last=False)


# -- KTO -------------------------------------------------------------------------------------------
def _completion_logps(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO: the shifted logits (a view) and the summed log-probs of ``ids[:, 1:]`` (mask: every token)."""
    shift = logits[:, :-1, :]
    per_token = selective_log_softmax(shift, ids[:, 1:])
    return shift, per_token.sum(-1)


def _kl_logps(t, model, kl_ids: torch.Tensor) -> torch.Tensor:
    """KTO ``_compute_kl_logps``: the mismatched sequences' log-probs under ``no_grad`` (logits freed on return)."""
    with torch.no_grad():
        kl_logits = _logits(t, model, kl_ids)
    _, logps = _completion_logps(kl_logits, kl_ids)
    del kl_logits
    t.logits_done()
    return logps


def _masked_rows(x: torch.Tensor) -> torch.Tensor:
    """``x[mask]`` for an all-true ``[rows, seq]`` mask: a fresh ``[rows * seq, vocab]`` tensor."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.index_select(0, torch.arange(flat.shape[0], device=x.device))


def _kto(t, *, reference: bool) -> dict:
    cfg = t.cfg
    ga = cfg.grad_accum
    b, s = cfg.batch, cfg.seq
    nd = (b + 1) // 2  # desirable examples of the micro-batch (label True first)
    acc = Accumulation(t)
    for _ in acc:
        ids = _ids(t, b, s)
        kl_ids = torch.roll(ids, shifts=1, dims=0)  # completions cycled by one within the batch
        kl_logps = _kl_logps(t, t.policy, kl_ids)
        logits = _logits(t, t.policy, ids)
        shift, logps = _completion_logps(logits, ids)
        # torch.nonzero(labels) / torch.nonzero(~labels) (data-dependent: the same indices, built directly)
        chosen_idx = torch.arange(nd, device=ids.device)
        rejected_idx = torch.arange(nd, b, device=ids.device)
        chosen, rejected = logps.index_select(0, chosen_idx), logps.index_select(0, rejected_idx)
        ref_out = None
        if reference:
            with torch.no_grad(), _reference_model(t) as ref:
                ref_kl = _kl_logps(t, ref, kl_ids)
                ref_out = _logits(t, ref, ids)
            ref_logps = _completion_logps(ref_out, ids)[1]  # ref_outputs lives to the end of the loss, not past it
            t.logits_done()
            ref_chosen, ref_rejected = ref_logps.index_select(0, chosen_idx), ref_logps.index_select(0, rejected_idx)
        else:  # precomputed: log-probs that came with the batch
            ref_kl = torch.zeros_like(kl_logps)
            ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
        kl = (kl_logps - ref_kl).mean().detach().clamp(min=0)
        losses = torch.cat((1 - torch.sigmoid(BETA * ((chosen - ref_chosen) - kl)),
                            1 - torch.sigmoid(BETA * (kl - (rejected - ref_rejected)))), 0)
        # metrics while the reference's output is still alive
        entropy = entropy_from_logits(shift.detach())
        del entropy
        c_logits = shift.detach().index_select(0, chosen_idx)
        r_logits = shift.detach().index_select(0, rejected_idx)
        # chosen_logits[chosen_mask.bool()]: a boolean-mask copy of every (completion) token's logits; with the
        # whole sequence as completion, the same copy by index (boolean indexing is data-dependent on meta)
        _c = _masked_rows(c_logits).mean(-1).sum()
        _r = _masked_rows(r_logits).mean(-1).sum()
        del _c, _r, c_logits, r_logits, ref_out
        loss = [losses.nanmean() / ga]  # owned by _backward, which empties it
        del losses, kl, kl_logps, ref_kl, logps, chosen, rejected, ref_chosen, ref_rejected, shift, logits, ids, kl_ids
        t.logits_done()
        acc.backward(loss)
    return acc.update()


def kto_step(t) -> dict:
    """KTO (TRL ``KTOTrainer``): KL estimate, policy, reference (adapter disabled, or the frozen copy)."""
    return _kto(t, reference=True)


def kto_precomputed_step(t) -> dict:
    """KTO with ``precompute_ref_log_probs=True``: the reference log-probs come with the batch."""
    return _kto(t, reference=False)


# -- reward model ----------------------------------------------------------------------------------
def reward_step(t) -> dict:
    """TRL ``RewardTrainer``: chosen + rejected through the sequence classifier, Bradley-Terry loss."""
    cfg = t.cfg
    ga = cfg.grad_accum
    n = cfg.batch
    inner = t.copies[Role.POLICY].inner
    if getattr(inner.config, "pad_token_id", None) is None:  # TRL sets it from the tokenizer
        inner.config.pad_token_id = 0
    acc = Accumulation(t)
    for _ in acc:
        ids = _ids(t, 2 * n, cfg.seq)
        logits = trainer_logits(t, t.policy, input_ids=ids)  # [2 x batch, 1]: one score a sequence
        rewards_chosen, rewards_rejected = torch.chunk(logits.squeeze(-1), chunks=2)
        del logits
        loss = [-F.logsigmoid(rewards_chosen - rewards_rejected).mean() / ga]  # owned by _backward, which empties it
        del rewards_chosen, rewards_rejected, ids
        t.logits_done()
        acc.backward(loss)
    return acc.update()


# -- DPO with precomputed reference log-probs -------------------------------------------------------
def dpo_precomputed_step(t) -> dict:
    """TRL ``DPOTrainer`` with ``precompute_ref_log_probs=True``: DPO's step with the reference
    log-probs read from the batch (no reference forward)."""
    return dpo_step(t, reference=False)
