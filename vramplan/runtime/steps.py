"""Real training steps: supervised fine-tuning, DPO and PPO, as the HF/TRL stack runs them.

Every step is ``cfg.grad_accum`` micro-batches then one optimiser update; a step reports
its phases through ``trainee.hooks``. The regime decides the runner:

* ``trainer`` regimes (bf16-mixed, fp16-mixed, fp32) follow HF ``Trainer`` + accelerate:
  autocast wraps the model's forward only, and accelerate's ``convert_outputs_to_fp32``
  upcasts the forward's 16-bit outputs (logits, hidden states) to fp32; the loss is divided
  by the accumulation steps; ``clip_grad_norm_(max_norm=1.0)`` runs before
  ``optimizer.step()``; ``zero_grad(set_to_none=True)`` after. fp16-mixed scales the loss
  (GradScaler).
* the ``loop`` regime (bf16) is a plain PyTorch loop: no autocast, no conversion, no
  clipping.

Inputs are full-length sequences without padding (no attention mask), labels a copy of the
input ids (``DataCollatorForLanguageModeling``); training forwards pass ``use_cache=False``.

Methods:

* SFT (full, lora, qlora, dora, ia3): ``model(input_ids, labels)`` -- the HF causal-LM loss
  (fp32 upcast of the logits, cross-entropy). With the ``liger_ce`` technique, Liger's patched
  forward instead: the backbone, then its fused linear cross-entropy (no logits tensor;
  emulated by :mod:`vramplan.runtime.liger`, as Liger's kernels need a GPU).
* DPO, as TRL's ``DPOTrainer.concatenated_forward``: chosen and rejected concatenated
  into one batch of ``2*batch`` sequences; per-token log-probs by TRL's
  ``selective_log_softmax`` (gather + per-row logsumexp for fp32 logits, per-row
  log_softmax for 16-bit ones); the mean chosen/rejected logits metric (a masked copy of
  the logits, the loss mask taken as the whole sequence); then the reference log-probs
  under ``no_grad`` (TRL computes them *after* the policy forward, while its activations are
  alive) with the adapter disabled (PEFT) or a frozen reference copy (full); sigmoid loss
  ``-logsigmoid(beta * margin)``.
* PPO, as TRL's ``PPOTrainer``: a rollout under ``no_grad`` without autocast (TRL
  generates with the unwrapped model): prefill of ``seq - response`` prompt tokens with
  ``logits_to_keep=1``, then decoding with a ``DynamicCache``, keeping each step's fp32
  scores (``output_scores``) and stacking them into ``[batch, response, vocab]``.
  On a real device every one of the ``response - 1`` decode steps runs: calibration times
  the whole rollout, and the step-time model counts every generated token (its
  ``gen_passes`` term). **Dry-run shortcut** (``fake`` builds only): the cache is pre-grown
  to ``seq - 3`` tokens and the score list to ``response - 2`` entries, and only the last
  two decode steps run (ending, as the real loop does, with ``seq - 1`` cached tokens and
  ``response`` scores) -- the decode loop's memory grows monotonically, so its peak is at
  its last step, which runs for real; nothing is timed on ``meta``. As in TRL's
  ``batch_generation``, the scores are stacked while ``generate``'s output still holds the
  cache. Then log-probs of the response, the
  reference forward (adapter disabled or reference copy), the value and reward scores
  (backbone with ``output_hidden_states=True``, score head on the last hidden state).
  Training: policy and value forwards under autocast (one wrapper, outputs converted to
  fp32), clipped policy loss and clipped value loss, backward, and TRL's post-backward
  entropy statistics (softmax of the response logits) under ``no_grad``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from ..methods import Role
from ..taxonomy import Component, Phase

BETA = 0.1  # TRL DPOConfig.beta
TEMPERATURE = 0.7  # TRL PPOConfig.temperature
CLIP_RANGE = 0.2  # TRL PPOConfig.cliprange / cliprange_value
VF_COEF = 0.1
ENTROPY_CHUNK = 128  # trl.trainer.utils.entropy_from_logits(chunk_size=128)


def run_step(t) -> dict:
    """One training step of ``t``'s method: the function its behaviour names (``behaviour.step``,
    ``"module:function"``; vramplan.methods.base.Behaviour), called with the trainee."""
    return step_function(t.recipe.behaviour.step)(t)


def step_function(path: str):
    """The step function named ``"module:function"`` (a behaviour's :attr:`~vramplan.methods.base.Behaviour.step`).

    Raises:
        VramplanError: the module or function does not exist.
    """
    from importlib import import_module

    from ..errors import VramplanError

    mod, _, fn = path.partition(":")
    try:
        return getattr(import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise VramplanError(f"method step {path!r} cannot be loaded ({exc})",
                            "a behaviour's step is 'package.module:function'") from None


# -- helpers ---------------------------------------------------------------------------------------
def _ids(t, batch: int, seq: int) -> torch.Tensor:
    dev = t.tensor_device
    return torch.randint(0, int(t.spec.vocab_size), (batch, seq), device=dev)


def _convert(t, out):
    """accelerate's ``convert_outputs_to_fp32`` where the Trainer's forward is wrapped by it."""
    if not t.regime.training_loop.fp32_outputs or t.regime.autocast is None:
        return out
    try:
        from accelerate.utils import convert_to_fp32
    except ImportError:  # pragma: no cover - accelerate ships with transformers' Trainer
        return out
    return convert_to_fp32(out)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax`` (trl/trainer/utils.py): log-probs of ``index`` under ``logits``."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])  # a row at a time, as TRL
        return selected - lse
    rows = []
    for row_logits, row_labels in zip(logits, index):
        row = F.log_softmax(row_logits, dim=-1)
        rows.append(row.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def trainer_logits(t, model, **inputs) -> torch.Tensor:
    """The model's logits as the HF Trainer hands them to a loss: the regime's autocast around the forward
    (``use_cache=False`` and ``inputs``), accelerate's fp32 conversion of its outputs (:func:`_convert`); the
    output object is freed here, the logits returned."""
    with t.amp():
        out = model(use_cache=False, **inputs)
    out = _convert(t, out)
    logits = out.logits
    del out
    return logits


def entropy_from_logits(logits: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` (trl/trainer/utils.py): flatten (``reshape``: a copy of a non-contiguous view,
    e.g. shifted logits of more than one row), then the entropy of ``chunk`` rows at a time (default
    :data:`ENTROPY_CHUNK`, TRL's ``chunk_size=128``), in ``logits``' shape less the vocabulary. The flattened copy
    lives until the entropies are joined, as in TRL."""
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for c in flat.split(chunk or ENTROPY_CHUNK, dim=0):
        lp = F.log_softmax(c, dim=-1)
        parts.append(-(torch.exp(lp) * lp).sum(-1))
        del lp
    ent = torch.cat(parts, dim=0).reshape(logits.shape[:-1])
    del parts, flat
    return ent


@contextmanager
def _reference_model(t) -> Iterator[torch.nn.Module]:
    """The reference model as TRL runs it (DPO and PPO): the frozen reference copy when the
    method holds one (full training), else the policy with its PEFT adapter disabled."""
    if Role.REFERENCE in t.copies:
        yield t.copies[Role.REFERENCE].module
    else:
        with t.policy.disable_adapter():
            yield t.policy


def _response_logprobs(logits: torch.Tensor, prompt: int, responses: torch.Tensor):
    """TRL PPO: the logits that predict the response tokens (a view), divided in place by the
    sampling temperature, and the response tokens' log-probs. Returns ``(logits, logprobs)``."""
    logits = logits[:, prompt - 1:-1]
    logits /= TEMPERATURE + 1e-7
    return logits, selective_log_softmax(logits, responses)


def _backward(t, owned: list) -> torch.Tensor:
    """One micro-batch's backward, taking ownership of its loss: ``owned`` is a one-element list the
    caller builds around the 0-dim loss (``loss = [expr]``) and hands over, so no caller name keeps the
    loss alive; it is emptied here. Opens the backward phase, runs ``t.backward``, keeps the detached
    loss (returned, for the step's result), frees the loss and signals ``after_backward``."""
    t.hooks.phase(Phase.BACKWARD)
    loss = owned.pop()
    t.backward(loss)
    last = loss.detach()
    del loss
    t.hooks.event("after_backward", t)
    return last


def _optimizer_step(t) -> None:
    t.hooks.phase(Phase.OPTIMIZER_STEP)
    opt = t.optimizer
    if t.scaler is not None:
        t.scaler.unscale_(opt)
    if t.regime.training_loop.clips_gradients:
        torch.nn.utils.clip_grad_norm_(t.trainable_parameters(), 1.0)
    if t.scaler is not None:
        t.scaler.step(opt)
        t.scaler.update()
    else:
        opt.step()
    t.hooks.event("after_optimizer_step", t)
    opt.zero_grad(set_to_none=True)
    t.hooks.event("step_end", t)


class Accumulation:
    """Gradient accumulation as the HF Trainer runs it, the loop of every method's step: ``cfg.grad_accum``
    micro-batches, each opening the forward phase and ending in a backward that owns its loss (:func:`_backward`),
    then one optimiser update (:func:`_optimizer_step`); the step's result is the last micro-batch's detached loss.

    The micro-batch's body stays in the step's own frame (``for k in acc: ...; acc.backward(loss)``, then
    ``return acc.update()``), so every tensor it binds lives exactly as long as in a plain loop: through its
    backward, until rebound by the next micro-batch, and, for the last, through the optimiser update. A helper
    that ran the body in a frame of its own would free them on return, before the backward, and move the peaks
    the dry run traces."""

    def __init__(self, t) -> None:
        self.t = t
        self.last = None

    def __iter__(self):
        """The micro-batches' indices ``0 .. grad_accum - 1``, each after opening the forward phase."""
        for k in range(self.t.cfg.grad_accum):
            self.t.hooks.phase(Phase.FORWARD)
            yield k

    def backward(self, owned: list) -> None:
        """:func:`_backward` of the micro-batch's loss (a one-element list it empties); keeps the detached loss."""
        self.last = _backward(self.t, owned)

    def update(self) -> dict:
        """The optimiser update after the micro-batches (:func:`_optimizer_step`); the step's result."""
        _optimizer_step(self.t)
        return {"loss": self.last}


# -- SFT -------------------------------------------------------------------------------------------
def sft_step(t) -> dict:
    cfg = t.cfg
    policy = t.policy
    ga = cfg.grad_accum
    acc = Accumulation(t)
    for _ in acc:
        ids = _ids(t, cfg.batch, cfg.seq)
        labels = ids.clone()
        with t.amp():
            if cfg.uses("liger_ce"):
                out = _liger_forward(t, ids, labels)
            else:
                out = policy(input_ids=ids, labels=labels, use_cache=False)
        out = _convert(t, out)
        loss = [out.loss / ga]  # owned by _backward, which empties it
        del out, ids, labels
        t.logits_done()
        acc.backward(loss)
    return acc.update()


def _liger_forward(t, ids: torch.Tensor, labels: torch.Tensor):
    """Liger's patched causal-LM forward (``lce_forward``): the backbone, then the fused linear
    cross-entropy on the last hidden states and the head's weight; no logits. The loss is
    :mod:`vramplan.runtime.liger`'s emulation of Liger's Triton kernels."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from .liger import causal_lm_loss

    inner = t.copies[Role.POLICY].inner
    backbone = getattr(inner, inner.base_model_prefix)
    hidden = backbone(input_ids=ids, use_cache=False)[0]
    t._head_pre_hook(None, (hidden,))  # the loss stands in for the output head (attribution only)
    loss = causal_lm_loss(hidden, inner.get_output_embeddings().weight, labels)
    t._head_post_hook(None, (hidden,), loss)
    return CausalLMOutputWithPast(loss=loss, logits=None)


# -- DPO -------------------------------------------------------------------------------------------
def _sequence_logps(t, model, ids: torch.Tensor, labels: torch.Tensor, with_metrics: bool):
    logits = trainer_logits(t, model, input_ids=ids)
    per_token = selective_log_softmax(logits, labels)
    per_token = torch.roll(per_token, shifts=1, dims=1)
    logps = per_token[:, 1:].sum(-1)
    metrics = None
    if with_metrics:  # TRL: logits[:n][loss_mask[:n]].mean() -- a masked copy; the mask taken as all tokens
        n = ids.shape[0] // 2
        flat = torch.arange(n * ids.shape[1], device=ids.device)
        chosen = logits[:n].reshape(-1, logits.shape[-1]).index_select(0, flat).mean()
        rejected = logits[n:].reshape(-1, logits.shape[-1]).index_select(0, flat).mean()
        metrics = (chosen.detach(), rejected.detach())
        del chosen, rejected, flat
    del logits, per_token
    t.logits_done()
    return logps, metrics


def dpo_step(t, reference: bool = True) -> dict:
    """TRL DPO: chosen + rejected through the policy, then the reference's log-probs under no_grad
    (``reference=False``: ``precompute_ref_log_probs``, read from the batch; no reference forward)."""
    cfg = t.cfg
    policy = t.policy
    ga = cfg.grad_accum
    acc = Accumulation(t)
    for _ in acc:
        ids = _ids(t, 2 * cfg.batch, cfg.seq)  # chosen then rejected, concatenated
        labels = torch.roll(ids, shifts=-1, dims=1)
        logps, _metrics = _sequence_logps(t, policy, ids, labels, with_metrics=True)
        if reference:
            with torch.no_grad(), _reference_model(t) as ref:
                ref_logps, _ = _sequence_logps(t, ref, ids, labels, False)
        else:
            ref_logps = torch.zeros_like(logps)
        n = cfg.batch
        margin = (logps[:n] - ref_logps[:n]) - (logps[n:] - ref_logps[n:])
        loss = [-F.logsigmoid(BETA * margin).mean() / ga]  # owned by _backward, which empties it
        del logps, ref_logps, margin, ids, labels
        acc.backward(loss)
    return acc.update()


# -- PPO -------------------------------------------------------------------------------------------
def _backbone_and_head(copy):
    inner = copy.inner
    return getattr(inner, inner.base_model_prefix), inner.score


def _score(t, copy, ids: torch.Tensor) -> torch.Tensor:
    """TRL's ``get_reward``: the backbone with all hidden states, the score head on the last one."""
    backbone, head = _backbone_and_head(copy)
    out = backbone(input_ids=ids, output_hidden_states=True, use_cache=False)
    values = head(out.hidden_states[-1])
    del out
    t.logits_done()
    return values


def _pregrow(t, cache, target: int) -> None:
    """Grow every layer of a DynamicCache to ``target`` tokens (fresh storage, as the decode loop's cat)."""
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, torch.Tensor) or k.dim() != 4:
            continue
        window = getattr(layer, "sliding_window", None)
        length = target if not window else min(target, int(window) - 1)
        layer.keys = torch.zeros(k.shape[0], k.shape[1], length, k.shape[3], dtype=k.dtype, device=k.device)
        layer.values = torch.zeros(v.shape[0], v.shape[1], length, v.shape[3], dtype=v.dtype, device=v.device)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = target


def _tag_cache(t, cache) -> None:
    for layer in getattr(cache, "layers", []):
        for x in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(x, torch.Tensor):
                t.hooks.tag(x, Component.KV_CACHE)


def _sample(scores: torch.Tensor) -> torch.Tensor:
    probs = F.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1)


def _rollout(t) -> dict:
    from transformers import DynamicCache

    cfg = t.cfg
    policy = t.policy
    b, s = cfg.batch, cfg.seq
    resp = int(t.recipe.behaviour.generation(cfg).generated_tokens)
    prompt = s - resp
    t.hooks.phase(Phase.ROLLOUT)
    was_training = {r: c.module.training for r, c in t.copies.items()}
    for c in t.copies.values():
        c.module.eval()
    try:
        with torch.no_grad():
            queries = _ids(t, b, prompt)
            cache = DynamicCache(config=t.copies[Role.POLICY].inner.config)
            out = policy(input_ids=queries, past_key_values=cache, use_cache=True, logits_to_keep=1)
            _tag_cache(t, cache)
            # generate(): next_token_logits.to(copy=True, dtype=float32), then TemperatureLogitsWarper
            scores = [out.logits[:, -1, :].to(copy=True, dtype=torch.float32) / TEMPERATURE]
            del out
            t.logits_done()
            t.hooks.tag(scores[-1], Component.KV_CACHE)
            nxt = _sample(scores[-1])
            tokens = [nxt]
            steps = resp - 1
            if getattr(t, "fake", False) and steps > 2:  # dry run: the last two decode steps (module docstring)
                _pregrow(t, cache, s - 3)  # after two more steps the cache holds prompt + response - 1 tokens
                for _ in range(steps - 2):
                    scores.append(torch.zeros(b, int(t.spec.vocab_size), dtype=torch.float32, device=queries.device))
                    t.hooks.tag(scores[-1], Component.KV_CACHE)
                tokens.append(torch.zeros(b, steps - 2, dtype=torch.long, device=queries.device))
                steps = 2
            t.decode_steps = getattr(t, "decode_steps", 0) + steps  # the decode forwards run, for tests and notes
            for _ in range(steps):
                out = policy(input_ids=nxt, past_key_values=cache, use_cache=True)
                _tag_cache(t, cache)
                scores.append(out.logits[:, -1, :].to(copy=True, dtype=torch.float32) / TEMPERATURE)
                del out
                t.logits_done()
                t.hooks.tag(scores[-1], Component.KV_CACHE)
                nxt = _sample(scores[-1])
                tokens.append(nxt)
            responses = torch.cat(tokens, dim=1)
            del tokens, nxt
            logitss = torch.stack(scores, 1)
            t.hooks.tag(logitss, Component.KV_CACHE)
            del scores
            del cache
            query_responses = torch.cat([queries, responses], dim=1)
            logprobs = selective_log_softmax(logitss, responses)
            del logitss
            with _reference_model(t) as ref:
                ref_out = ref(input_ids=query_responses, output_hidden_states=True, use_cache=False)
            ref_logits, ref_logprobs = _response_logprobs(ref_out.logits, prompt, responses)
            del ref_out, ref_logits
            t.logits_done()
            values = _score(t, t.copies[Role.VALUE], query_responses)[:, prompt - 1:-1].squeeze(-1)
            rewards = _score(t, t.copies[Role.REWARD], query_responses)[:, -1, 0]
            # advantages and returns (GAE): [batch, response] fp32 tensors
            kl = logprobs - ref_logprobs
            advantages = (-kl * 0.05 + rewards[:, None] - values).float()
            returns = advantages + values
    finally:
        for r, c in t.copies.items():
            c.module.train(was_training[r])
    return dict(query_responses=query_responses, responses=responses, logprobs=logprobs, values=values,
                advantages=advantages, returns=returns, prompt=prompt)


def ppo_step(t) -> dict:
    cfg = t.cfg
    policy = t.policy
    ga = cfg.grad_accum
    roll = _rollout(t)
    qr, responses, prompt = roll["query_responses"], roll["responses"], roll["prompt"]
    acc = Accumulation(t)
    for _ in acc:
        with t.amp():  # PolicyAndValueWrapper.forward: critic backbone + score, then the policy
            backbone, head = _backbone_and_head(t.copies[Role.VALUE])
            vout = backbone(input_ids=qr, output_hidden_states=True, use_cache=False)
            vpred_temp = head(vout.hidden_states[-1])
            del vout
            out = policy(input_ids=qr, output_hidden_states=True, use_cache=False)
        out, vpred_temp = _convert(t, (out, vpred_temp))
        logits = out.logits
        del out
        logits, new_logprobs = _response_logprobs(logits, prompt, responses)
        vpred = vpred_temp[:, prompt - 1:-1].squeeze(-1)
        del vpred_temp
        t.logits_done()
        vclipped = torch.clamp(vpred, roll["values"] - CLIP_RANGE, roll["values"] + CLIP_RANGE)
        ret = roll["returns"]
        vf_loss = 0.5 * torch.max(torch.square(vpred - ret), torch.square(vclipped - ret)).mean()
        ratio = torch.exp(new_logprobs - roll["logprobs"])
        pg = torch.max(-roll["advantages"] * ratio,
                       -roll["advantages"] * torch.clamp(ratio, 1.0 - CLIP_RANGE, 1.0 + CLIP_RANGE)).mean()
        loss = [(pg + VF_COEF * vf_loss) / ga]  # owned by _backward, which empties it
        del vpred, vclipped, vf_loss, ratio, pg, new_logprobs
        acc.backward(loss)
        with torch.no_grad():  # TRL's entropy statistic, while the response logits are alive
            prob_dist = F.softmax(logits, dim=-1)
            entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob_dist * logits, dim=-1)
            del prob_dist, entropy
        del logits
    return acc.update()


# -- public helpers for the method steps of other runtime modules (vramplan/runtime/preference.py) --------
#: random token ids of ``(batch, seq)`` on the trainee's tensor device
random_ids = _ids
#: the reference model as TRL runs it (the frozen copy, else the policy with its adapter disabled)
reference_model = _reference_model
# -- GRPO ------------------------------------------------------------------------------------------
GRPO_TEMPERATURE = 1.0  # TRL GRPOConfig.temperature
GRPO_EPSILON = 0.2  # TRL GRPOConfig.epsilon (epsilon_high defaults to it)


def _completion_logps(t, model, ids: torch.Tensor, completion: int, *, entropy: bool):
    """TRL ``_get_per_token_logps_and_entropies`` for one chunk: the completion's per-token log-probs from a
    forward with ``logits_to_keep = completion + 1`` (autocast, outputs converted to fp32), the last position
    dropped, divided in place by the temperature; the entropy (``entropy_from_logits``) under no_grad."""
    logits = trainer_logits(t, model, input_ids=ids, logits_to_keep=completion + 1)
    logits = logits[:, :-1, :]
    logits = logits[:, -completion:, :]
    logits.div_(GRPO_TEMPERATURE)
    logps = selective_log_softmax(logits, ids[:, -completion:])
    ent = None
    if entropy:
        with torch.no_grad():
            ent = entropy_from_logits(logits)  # flattening copies the slice when it is not contiguous (batch > 1)
    del logits
    t.logits_done()
    return logps, ent


def _generate_completions(t, n: int, prompt: int, completion: int) -> torch.Tensor:
    """transformers ``generate`` (``_sample``, TRL's sampling defaults: no logits processor) over ``n`` prompts of
    ``prompt`` tokens: the prompt ids followed by ``completion`` sampled tokens. Dry run: the last two decode
    steps only, the cache pre-grown (module docstring)."""
    from transformers import DynamicCache

    policy = t.policy
    # accelerate's unwrap_model keeps the autocast wrapper (autocast, outputs converted to fp32) on the prepared
    # model's forward: generate() on a full model calls it once per forward; a PEFT model's generate() calls the
    # base model's forward, without it
    wrapped = not t.recipe.adapter.is_peft

    def forward(**kw):
        if not wrapped:
            return policy(**kw)
        with t.amp():
            out = policy(**kw)
        return _convert(t, out)

    with torch.no_grad():
        ids = _ids(t, n, prompt)
        cache = DynamicCache(config=t.copies[Role.POLICY].inner.config)
        out = forward(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _tag_cache(t, cache)
        scores = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        probs = F.softmax(scores, dim=-1)
        tokens = [torch.multinomial(probs, num_samples=1)]
        del out, scores, probs
        t.logits_done()
        steps = completion - 1
        if getattr(t, "fake", False) and steps > 2:
            _pregrow(t, cache, prompt + completion - 3)  # after two more steps: prompt + completion - 1 cached
            tokens.append(torch.zeros(n, steps - 2, dtype=torch.long, device=ids.device))
            steps = 2
        seq = torch.cat([ids] + tokens, dim=1)
        del tokens, ids
        t.decode_steps = getattr(t, "decode_steps", 0) + steps
        for _ in range(steps):
            out = forward(input_ids=seq[:, -1:], past_key_values=cache, use_cache=True)
            _tag_cache(t, cache)
            scores = out.logits[:, -1].to(copy=True, dtype=torch.float32)  # generate(): next_token_logits
            t.hooks.tag(scores, Component.KV_CACHE)
            probs = F.softmax(scores, dim=-1)
            t.hooks.tag(probs, Component.KV_CACHE)
            seq = torch.cat([seq, torch.multinomial(probs, num_samples=1)], dim=1)
            del out, scores, probs
            t.logits_done()
        del cache
    return seq


def grpo_step(t) -> dict:
    """GRPO as TRL's ``GRPOTrainer`` (module docstring): generation of the generation batch, scoring, then
    ``grad_accum`` clipped updates of ``batch`` completions each."""
    from ..methods.grpo import settings

    gs = settings(t.cfg)
    cfg, policy = t.cfg, t.policy
    b, completion, g = cfg.batch, gs.completion, gs.num_generations
    t.hooks.phase(Phase.ROLLOUT)
    with torch.no_grad():
        if gs.generates_here:
            seq = _generate_completions(t, gs.generation_batch, gs.prompt, completion)
        else:  # vLLM returns the completions' token ids (and its own log-probs)
            seq = _ids(t, gs.generation_batch, gs.prompt + completion)
        n = seq.shape[0]
        old = ref = None
        if gs.old_logps:
            old = torch.cat([_completion_logps(t, policy, seq[i:i + b], completion, entropy=False)[0]
                             for i in range(0, n, b)])
        if gs.beta > 0:
            with _reference_model(t) as reference:
                ref = torch.cat([_completion_logps(t, reference, seq[i:i + b], completion, entropy=False)[0]
                                 for i in range(0, n, b)])
        rewards = torch.zeros(n, dtype=torch.float32, device=seq.device)  # the reward functions' scores
        grouped = rewards.view(-1, g)
        advantages = ((rewards - grouped.mean(1).repeat_interleave(g))
                      / (grouped.std(1).repeat_interleave(g) + 1e-4))
        mask = torch.ones(n, completion, dtype=torch.int64, device=seq.device)
        del rewards, grouped
    acc = Accumulation(t)
    for k in acc:
        lo = (k * b) % n
        ids, m = seq[lo:lo + b], mask[lo:lo + b]
        logps, _entropy = _completion_logps(t, policy, ids, completion, entropy=True)
        old_k = logps.detach() if old is None else old[lo:lo + b]
        coef_1 = torch.exp(logps - old_k)
        coef_2 = torch.clamp(coef_1, 1 - GRPO_EPSILON, 1 + GRPO_EPSILON)
        adv = advantages[lo:lo + b].unsqueeze(1)
        per_token = -torch.min(coef_1 * adv, coef_2 * adv)
        if ref is not None:
            r = ref[lo:lo + b]
            per_token = per_token + gs.beta * (torch.exp(r - logps) - (r - logps) - 1)
        loss = [_grpo_reduce(gs, per_token, m, cfg.grad_accum)]  # owned by _backward, which empties it
        del logps, old_k, coef_1, coef_2, adv, per_token, _entropy
        acc.backward(loss)
    return acc.update()


def _grpo_reduce(gs, per_token: torch.Tensor, mask: torch.Tensor, ga: int) -> torch.Tensor:
    """TRL ``_compute_loss``'s reduction by ``loss_type`` (each over ``[batch, completion]``)."""
    masked = per_token * mask
    if gs.loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    if gs.loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / ga
    if gs.loss_type == "dr_grpo":
        return masked.sum() / (per_token.size(0) * gs.completion) / ga
    return masked.sum() / float(mask.numel() * ga)  # dapo: the active tokens of the accumulated batch
