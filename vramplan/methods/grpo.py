"""GRPO (TRL ``GRPOTrainer``): G completions per prompt, group-normalised advantages, a clipped update.

One behaviour module (this one) plus its entry in ``methods.toml`` (the policy alone: TRL loads no
reference at its default ``beta = 0.0``; with ``beta > 0`` and PEFT the reference is the policy with
the adapter disabled, no second copy) and its torch step (``vramplan.runtime.steps:grpo_step``).

TRL facts followed (TRL v1.9.0, tag a785283, ``trl/trainer/grpo_config.py`` and
``grpo_trainer.py``; unchanged at main f2cd577 for what is used here):

* ``beta`` defaults to 0.0 since TRL v0.19.0 (commit 7359ddc; 0.04 before): no reference model is
  loaded. ``loss_type`` defaults to ``"dapo"`` since v0.22.0 (2324245; ``"bnpo"`` before).
  ``num_generations`` defaults to 8 (at least 2), ``max_completion_length`` to 512;
  ``max_prompt_length`` was removed in v0.28.0 (89070d2): prompts are as long as the data.
  ``GRPOConfig`` turns ``gradient_checkpointing`` on by default (vramplan's ``--gc`` is a separate
  choice: pass it to match).
* ``per_device_train_batch_size`` counts completions. ``steps_per_generation`` defaults to
  ``gradient_accumulation_steps``; one generation batch of ``per_device_train_batch_size x
  steps_per_generation`` completions per device is generated at once and must hold whole groups
  (``generation_batch_size % num_generations == 0``, world size 1 here), then consumed one
  micro-batch at a time (``_buffered_inputs``).
* Old-policy log-probs are computed (a no-grad forward per micro-batch of the generation batch)
  only when ``gradient_accumulation_steps % (steps_per_generation x num_iterations) != 0``, or with
  vLLM (``vllm_importance_sampling_correction`` defaults to True); reference log-probs only when
  ``beta != 0``. Each is a ``[generation batch, completion]`` fp32 buffer.
* The loss variants ``grpo``, ``dr_grpo``, ``bnpo``, ``dapo`` differ only in how the
  ``[batch, completion]`` per-token loss is reduced: none changes memory beyond that.
* ``use_vllm`` with ``vllm_mode="colocate"``: vLLM runs in the training process and takes
  ``vllm_gpu_memory_utilization`` (default 0.3) of the card for its weights and KV cache; the
  training step is planned in the rest. ``vllm_mode="server"``: generation runs on other GPUs (no
  generation memory on the training card).

Numpy only: nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Any

import numpy as np

from .. import activations as act
from ..errors import VramplanError
from ..memory import model_state
from ..precision import DTYPE_BYTES
from . import Adapter, Forward, ModelCopy, Role  # the package (loaded before any behaviour module)
from .base import Behaviour, Generation, Option

#: TRL's ``max_completion_length`` default (tokens)
TRL_COMPLETION = 512
GENERATION_MODES = ("transformers", "vllm-colocate", "vllm-server")
#: TRL's loss types: every one reduces [batch, completion] per-token tensors (the same memory)
LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
#: TRL ``entropy_from_logits(chunk_size=128)``: rows of logits per entropy chunk
ENTROPY_CHUNK = 128

NUM_GENERATIONS = Option(
    name="num_generations", kind="int", default=8, flag="--num-generations", lo=2,
    help="GRPO: completions per prompt, G (TRL num_generations; default 8)", trainer_keys=("num_generations",))
COMPLETION = Option(
    name="completion", kind="int", default=None, flag="--completion", shape=True,
    help="GRPO: completion tokens (TRL max_completion_length; default 512, at most half of --seq); "
         "the prompt is the rest of --seq", trainer_keys=("max_completion_length",))
BETA = Option(
    name="grpo_beta", kind="float", default=0.0, flag="--grpo-beta", lo=0.0,
    help="GRPO: KL coefficient (TRL beta, default 0.0: no reference forward)", trainer_keys=("beta",))
LOSS_TYPE = Option(
    name="grpo_loss_type", kind="str", default="dapo", flag="--grpo-loss-type", choices=LOSS_TYPES,
    help="GRPO: TRL loss_type (dapo, grpo, dr_grpo, bnpo, ...: the same memory)", trainer_keys=("loss_type",))
STEPS_PER_GENERATION = Option(
    name="steps_per_generation", kind="int", default=None, flag="--steps-per-generation",
    help="GRPO: micro-batches per generation batch (TRL default: --grad-accum, raised to hold whole groups)",
    trainer_keys=("steps_per_generation",))
NUM_ITERATIONS = Option(
    name="num_iterations", kind="int", default=1, flag="--num-iterations",
    help="GRPO: updates per generation batch (TRL num_iterations, mu)", trainer_keys=("num_iterations",))
GENERATION = Option(
    name="generation", kind="str", default="transformers", flag="--generation", choices=GENERATION_MODES,
    help="GRPO: who generates: transformers (generate on the training card), vllm-colocate, vllm-server",
    trainer_keys=("use_vllm", "vllm_mode"))
VLLM_SHARE = Option(
    name="vllm_gpu_memory_utilization", kind="float", default=0.3, flag="--vllm-gpu-memory-utilization",
    lo=0.01, hi=0.95, help="GRPO with --generation vllm-colocate: share of the card vLLM takes (default 0.3)",
    trainer_keys=("vllm_gpu_memory_utilization",))


@dataclass(frozen=True)
class Settings:
    """One GRPO configuration resolved (TRL semantics, one GPU). Token counts per sequence; ints.

    Attributes:
        num_generations: G.
        completion, prompt: tokens per sequence (``prompt + completion = --seq``).
        beta, loss_type, num_iterations, generation, vllm_share: TRL's options.
        steps_per_generation: micro-batches one generation batch serves.
        generation_batch: completions generated at once on the device (``batch x steps_per_generation``).
        old_logps: the old policy's log-probs are computed and kept (see the module docstring).
        raised_from: TRL's default ``steps_per_generation`` (``grad_accum``) when it had to be raised
            for the generation batch to hold whole groups (0: not raised).
    """

    num_generations: int
    completion: int
    prompt: int
    beta: float
    loss_type: str
    steps_per_generation: int
    num_iterations: int
    generation: str
    vllm_share: float
    generation_batch: int
    old_logps: bool
    raised_from: int = 0

    @property
    def generates_here(self) -> bool:
        """Whether the training card runs ``generate`` (transformers); vLLM holds its own share or another card."""
        return self.generation == "transformers"

    @property
    def buffers(self) -> int:
        """The ``[generation batch, completion]`` fp32 log-prob buffers kept (old policy, reference)."""
        return int(self.old_logps) + int(self.beta > 0)


def default_completion(seq: Any) -> Any:
    """TRL's ``max_completion_length`` (512), at most half of ``seq`` (tokens; an int, or a numpy grid)."""
    if isinstance(seq, (int, np.integer)):
        return max(1, min(TRL_COMPLETION, int(seq) // 2))
    return np.maximum(np.minimum(float(TRL_COMPLETION), np.asarray(seq, dtype=np.float64) / 2), 1.0)


def steps_per_generation(batch: int, grad_accum: int, num_generations: int, given: int | None = None) -> tuple[int, int]:
    """``(steps_per_generation, raised_from)``: TRL's default ``grad_accum``, raised to the least multiple of
    ``G / gcd(G, batch)`` at or above it when ``batch x grad_accum`` would not hold whole groups of G (TRL
    refuses such a configuration; vramplan plans the smallest one it accepts and says so). ``given`` is used as
    is (it must hold whole groups)."""
    need = num_generations // gcd(num_generations, batch)
    if given is not None:
        if given % need:
            raise VramplanError(f"GRPO: the generation batch ({batch} x {given} steps per generation) must hold whole "
                                f"groups of --num-generations {num_generations}",
                                f"use a --steps-per-generation that is a multiple of {need}")
        return int(given), 0
    spg = -(-grad_accum // need) * need
    return spg, (grad_accum if spg != grad_accum else 0)


_SETTINGS_CACHE: dict = {}


def settings(cfg: Any, seq: Any = None) -> Settings:
    """The GRPO settings of ``cfg`` (a TrainConfig of method grpo). ``seq`` overrides ``cfg.seq`` for the
    token split (an int).

    Kept per ``(cfg, seq)`` (all it reads; a search asks hundreds of times); an unhashable one is worked out.

    Raises:
        VramplanError: the generation batch cannot hold whole groups.
    """
    key = (cfg, seq)
    try:
        kept = _SETTINGS_CACHE.get(key)
    except TypeError:
        return _settings(cfg, seq)
    if kept is None:
        kept = _settings(cfg, seq)
        if len(_SETTINGS_CACHE) > 1024:
            _SETTINGS_CACHE.clear()
        _SETTINGS_CACHE[key] = kept
    return kept


def _settings(cfg: Any, seq: Any = None) -> Settings:
    """:func:`settings` worked out."""
    s = int(cfg.seq if seq is None else seq)
    g = int(cfg.option("num_generations", NUM_GENERATIONS.default))
    comp = cfg.option("completion")
    comp = int(comp) if comp is not None and seq is None else default_completion(s)
    comp = min(comp, s - 1)
    gen = str(cfg.option("generation", GENERATION.default))
    spg, raised = steps_per_generation(int(cfg.batch), int(cfg.grad_accum), g, cfg.option("steps_per_generation"))
    ni = int(cfg.option("num_iterations", NUM_ITERATIONS.default))
    beta = float(cfg.option("grpo_beta", BETA.default))
    old = (int(cfg.grad_accum) % (spg * ni) != 0) or gen != "transformers"
    return Settings(num_generations=g, completion=comp, prompt=s - comp, beta=beta,
                    loss_type=str(cfg.option("grpo_loss_type", LOSS_TYPE.default)), steps_per_generation=spg,
                    num_iterations=ni, generation=gen, vllm_share=float(cfg.option("vllm_gpu_memory_utilization",
                                                                                    VLLM_SHARE.default)),
                    generation_batch=int(cfg.batch) * spg, old_logps=old, raised_from=raised)


# -- the analytic terms ------------------------------------------------------------------------------
def _dtypes(model, cfg):
    pol = cfg.recipe.copies[0]
    d = act.copy_dtypes(pol, cfg.regime, cfg.stack.kbit_upcast)
    # the logits the trainer's loss sees: accelerate converts the 16-bit logits to fp32 (HF Trainer)
    fp32_outputs = cfg.regime.training_loop.fp32_outputs
    lg = 4.0 if (d.logits == 4 or fp32_outputs) else float(d.logits)
    converted = d.logits != 4 and fp32_outputs
    return pol, d, lg, converted


def nograd_layer_work(model, cfg, tokens, seq, autocast: bool = True, kv_layer=0.0, uncast=0.0) -> np.ndarray:
    """Bytes one decoder layer's no-grad forward holds at its peak (the generation's prefill, the scoring
    forwards), for ``tokens`` tokens of length-``seq`` sequences; ``autocast``: under the regime's autocast
    (the scoring forwards; a full model's ``generate``) or not (a PEFT model's ``generate``: accelerate's
    autocast wrapper sits on the PeftModel's forward, which ``generate`` does not call). ``kv_layer``: one
    layer's KV cache, made by its projections (0: no cache); ``uncast``: autocast's weight casts the caller
    counts for the whole layer that do not exist yet at its attention (its MLP's), taken off an attention-time
    peak (eager attention's softmax).

    Measured by the dry run (runtime.steps:grpo_step on meta) on Llama-, Qwen2/3-, Mistral- and Gemma-2-shaped
    models: the MLP's ``act(gate) * up`` -- three ``tokens x intermediate`` tensors (act, up, product) in the
    projections' dtype -- beside four ``tokens x hidden`` ones in the residual dtype (the embedding output the
    model's forward keeps, the layer's input its caller keeps, the attention residual sum, the normed MLP
    input). QLoRA: or two of them beside the dequantised weight. SDPA on fp32 inputs with grouped kv heads
    (QLoRA's fp32 residual stream without autocast) runs the math composite: the scores and their masked sum,
    ``[batch, heads, seq, seq]`` fp32 each, beside k and v repeated to every head. Eager attention: the layer
    keeps its probabilities (the ``attn_weights`` the decoder layer binds) and the model its additive masks.
    Dense MLPs only (a MoE layer's experts are smaller; this errs on the safe side).
    """
    pol, d, _, _ = _dtypes(model, cfg)
    res = float(d.residual)
    mlp = float(d.proj_out) if autocast else res
    attn = float(d.attn) if autocast else res
    T = np.asarray(tokens, dtype=np.float64)
    s = np.asarray(seq, dtype=np.float64)
    rows = T / np.maximum(s, 1.0)
    h, inter, qd = model.hidden_size, model.intermediate_size, model.q_dim
    if model.is_moe:
        # routed tokens (top-k per token): the permuted inputs, the experts' fused gate_up output, act, product
        # (small experts: the combine's permuted input, the routed outputs and their weighted copies, 4 x hidden)
        k, ie = model.experts_per_token, model.moe_intermediate_size
        work = T * (4 * h * res + k * max(h + 4 * ie, 4 * h) * mlp + 3 * model.shared_expert_intermediate_size * mlp)
    elif model.fused_gate_up:  # Phi-3: gate_up's output (2 x intermediate) beside act(gate) and the product
        work = T * (4 * h * res + 4 * inter * mlp)
    else:
        work = T * (4 * h * res + 3 * inter * mlp)
    if pol.quantized:
        work = np.maximum(work, T * (4 * h * res + 2 * inter * mlp) + inter * h * DTYPE_BYTES[cfg.regime.compute_dtype])
    if not autocast and pol.adapter is not None and pol.adapter.low_rank:
        # PEFT's unmerged LoRA path without autocast: the input cast to the fp32 adapter dtype (unless it is fp32),
        # the base output, lora_B's fp32 output and its scaled copy; beside the attention block's context (the
        # embedding output, the layer input, the normed input) or the MLP's (and act(gate) at up_proj)
        ad = float(d.adapter)
        targets = set(cfg.targets)
        for lin in model.layer_linears():
            if lin.name not in targets or not lin.is_linear:
                continue
            mlp_side = lin.name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
            ctx = (4 * h * res + (inter * mlp if lin.name in ("up_proj", "down_proj") else 0)) if mlp_side else 3 * h * res
            cast = lin.in_features * ad if res != ad else 0.0
            # an attention projection runs before its layer's keys and values are cached
            work = np.maximum(work, T * (ctx + cast + lin.out_features * (mlp + 2 * ad)) - (0 if mlp_side else kv_layer))
    # q and k leave the rotary embedding in the hidden states' dtype when it is wider (cos/sin are cast to it);
    # under autocast SDPA then gets 16-bit casts of them (and of v when its projection ran outside autocast)
    qk = max(attn, res)
    sdpa_casts = attn * (qd + model.kv_dim) if (autocast and qk != attn) else 0.0
    kernel = cfg.attention
    if kernel.torch_sdpa and model.sliding_window:
        # a sliding-window layer's mask (sequence past the window) as SDPA gets it: fp32 and in the attention dtype
        # (beside the attention block's context -- the embedding output, the layer input, the normed input, q and
        # SDPA's casts -- and the [1, 1, s, s] boolean mask); at the attention the MLP's casts are not made yet
        work = np.maximum(work, np.where(s > model.sliding_window, T * (3 * h * res + qd * qk + sdpa_casts)
                                         + rows * s * s * (4 + attn) + s * s - kv_layer - uncast, 0.0))
    gqa = model.kv_dim < model.q_dim
    if kernel.torch_sdpa and attn == 4 and gqa:
        # q, q scaled, k and v repeated to every head; the scores and their masked sum; the [1, 1, s, s] mask
        scores = T * (3 * h * res + 4 * qd * attn) + 2.0 * rows * model.num_heads * s * s * attn + s * s * attn
        work = np.maximum(work, scores)
    if kernel.materialises_scores:
        # the layer keeps its probabilities (the decoder layer binds ``attn_weights``) through its MLP; inside
        # the attention block the softmax peaks (act.eager_softmax_peak: the scores, their fp32 conversion and
        # softmax's fp32 output, 10 bytes per score in bf16) beside its context: the embedding output, the
        # layer input, the normed input, q, and k and v repeated to every head when grouped (their caller's
        # copies: the rotary k and the projections' v, unless the KV cache took them, ``kv_layer`` > 0). q and k
        # leave the rotary embedding in the hidden states' dtype when it is wider (cos/sin are cast to it)
        scores = rows * model.num_heads * s * s
        peak = act.eager_softmax_peak(attn, res, cfg.regime.compute_dtype)
        kv_own = np.where(np.asarray(kv_layer) > 0, 0.0, model.kv_dim * (qk + attn))
        ctx = T * (3 * h * res + qd * qk + (qd * (qk + attn) if gqa else 0.0) + kv_own)
        work = (np.maximum(work + scores * attn, ctx + scores * peak - uncast)
                + act.attention_mask_bytes(model, cfg, cfg.regime, rows, s))
    return work


def _grid_steps(cfg, gs: Settings, batch) -> tuple[np.ndarray, np.ndarray]:
    """``(steps_per_generation, old log-probs kept as 0/1)`` for every micro-batch of ``batch`` (a grid): TRL's
    default ``grad_accum`` raised to hold whole groups (:func:`steps_per_generation`), or the given value."""
    b = np.maximum(np.asarray(batch, dtype=np.int64), 1)
    ga, g = int(cfg.grad_accum), gs.num_generations
    given = cfg.option("steps_per_generation")
    if given is not None:
        spg = np.full(b.shape, int(given), dtype=np.int64)
    else:
        need = g // np.gcd(g, b)
        spg = -(-ga // need) * need
    old = ((ga % (spg * gs.num_iterations)) != 0) | (not gs.generates_here)
    return spg.astype(np.float64), old.astype(np.float64)


def grpo_terms(model, cfg, terms: Any, batch, seq) -> Any:
    """GRPO's :class:`vramplan.phases.StepTerms` (bytes over ``batch``/``seq``), from SFT's for the
    same micro-batch of ``batch`` completions of ``seq`` = prompt + completion tokens:

    * logits: the policy's forward keeps only ``completion + 1`` positions (``logits_to_keep``): fp32
      after accelerate's conversion (the 16-bit ones beside them while converting); the entropy under
      ``no_grad`` copies the sliced logits when ``batch > 1`` (``reshape`` of a non-contiguous slice) and
      works on 128 rows at a time (log_softmax, exp, product); backward holds 4 fp32 copies (the logits,
      their gradient through the row-wise logsumexp, the gather's, the slice's) -- dry run. Gemma-2's
      soft-capping saves its tanh output too.
    * buffers kept through the update (``_buffered_inputs``): the generation batch's token ids and
      completion mask (int64), its old/reference log-prob buffers (fp32) and advantages.
    * the rollout phase: the KV cache of the generation batch (``generation_batch x seq`` tokens) plus the
      largest of: the last decode step (one layer's keys re-concatenated, or the sampling buffers -- the
      last position's 16-bit logits, their fp32 copy, the softmax -- whichever is larger), the prompt's
      prefill (its cache and :func:`nograd_layer_work`), the scoring forwards (one micro-batch's
      :func:`nograd_layer_work` or its logits, beside the buffers). vLLM generates elsewhere (its share
      of the card is outside these tensors): only the scoring remains.

    Source: TRL v1.9.0 ``GRPOTrainer`` (module docstring), matched op by op to the dry run.
    """
    regime, kbit = cfg.regime, cfg.stack.kbit_upcast
    pol, d, lg, converted = _dtypes(model, cfg)
    dl = d.residual
    V = model.vocab_size
    b = np.asarray(batch, dtype=np.float64)
    s = np.asarray(seq, dtype=np.float64)
    gs = settings(cfg) if np.ndim(seq) == 0 else None
    comp = (np.minimum(float(cfg.option("completion")), s - 1) if cfg.option("completion") is not None
            else default_completion(s)) if gs is None else float(gs.completion)
    if gs is None:
        gs = settings(cfg.with_(seq=max(int(np.max(s)), 2)))
    C = np.asarray(comp, dtype=np.float64)
    P = s - C
    zeros = terms.zeros
    Tc = b * (C + 1)
    ent = np.where(b > 1, b * C * V * 4.0, 0.0) + 3.0 * np.minimum(float(ENTROPY_CHUNK), b * C) * V * 4.0
    fwd = np.maximum(Tc * V * (lg + (d.logits if converted else 0.0)), Tc * V * lg + ent)
    bwd = Tc * V * 4.0 * lg
    if model.final_logit_softcapping:
        fwd, bwd = fwd + Tc * V * d.logits, bwd + Tc * V * d.logits
    logits_fwd, logits_bwd = fwd + zeros, bwd + zeros
    # the generation batch of each micro-batch of the grid (TRL's steps_per_generation follows the batch)
    spg, old = _grid_steps(cfg, gs, b)
    gb = b * spg
    nbuf = old + (1.0 if gs.beta > 0 else 0.0)
    buf = gb * s * 8 + gb * C * 8 + nbuf * gb * C * 4 + gb * 4
    acts = terms.acts + buf
    peak = zeros.copy()
    if np.any(nbuf > 0):
        score = np.maximum(nograd_layer_work(model, cfg, b * s, s), Tc * V * (lg + (d.logits if converted else 0.0))
                           + C * V * 4.0)
        peak = np.maximum(peak, np.where(nbuf > 0, buf + score, 0.0))
    kv = zeros.copy()
    if gs.generates_here:
        # a full model generates under accelerate's autocast wrapper (16-bit keys and values, logits converted
        # to fp32); a PEFT model's generate() bypasses it (the residual dtype throughout)
        gen_ac = not pol.adapter.is_peft
        kvd = float(d.proj_out) if gen_ac else float(dl)
        # the keys are cached after the rotary embedding, whose cos/sin come in the hidden states' dtype: an fp32
        # residual stream under autocast (a full model) caches fp32 keys beside 16-bit values (the dry run)
        kd = max(kvd, float(dl))
        kv = gb * s * model.num_layers * model.kv_dim * (kd + kvd) + zeros
        kv_one = gb * s * model.kv_dim * kd
        last = lg if gen_ac else float(dl)
        # autocast's casts of the fp32 trainable weights, cached while one forward runs (a full model's generate):
        # every layer's by the last layer's end (the keys re-concatenated), gone once the forward has returned
        # (a PEFT policy's generate casts nothing, and its model state -- which reads the rank, a tuple of ranks
        # under memory.step_terms' rank axis -- is not asked for)
        st = model_state(model, cfg) if gen_ac else None
        casts = model.num_layers * st.layer_cast if gen_ac else 0
        # (at a layer's attention its MLP's weights are not cast yet)
        mlp_casts = st.layer_cast - st.attn_cast if gen_ac else 0
        end = kv + np.maximum(gb * V * (last + 8.0), kv_one + casts)
        kv_layer = gb * P * model.kv_dim * (kd + kvd)
        prefill = model.num_layers * kv_layer + nograd_layer_work(model, cfg, gb * P, P, autocast=gen_ac,
                                                                  kv_layer=kv_layer, uncast=mlp_casts) + casts
        peak = np.maximum(peak, np.maximum(end, prefill))
    return terms.with_(logits_fwd=logits_fwd, logits_bwd=logits_bwd, acts=acts, kv=kv,
                       rollout_logits=np.maximum(peak - kv, 0.0),
                       # a held reference (full training, beta > 0) scores with the policy, counted above
                       nograd_peak=terms.zeros * 0)


# -- the limits: the largest G x completion on a card (fit) ----------------------------------------------
#: Generations per prompt searched (TRL needs G >= 2)
G_GRID = (2, 4, 8, 16, 32, 64, 128, 256)
#: Completion lengths are searched in steps of this many tokens
COMPLETION_STEP = 128


@dataclass
class LimitRow:
    """One adapter x generation engine of :class:`GenerationLimits`. Bytes are per-GPU device totals (ints).

    ``usable_bytes``: the card less colocated vLLM's share; ``peak_bytes``: the requested G x completion's
    device total; ``max_completion``: the longest completion (multiple of 128) at the requested G, 0 if none;
    ``max_generations``: the largest G of :data:`G_GRID` at the requested completion, 0 if none;
    ``frontier``: (G, longest completion) for every G of the grid that fits at 128 tokens.
    ``vllm_bytes``: what colocated vLLM needs in its share for the requested G x completion
    (:func:`vllm_bytes`; 0 with transformers' generate).
    """

    adapter: str
    generation: str
    vllm_share: float
    usable_bytes: int
    fits: bool
    peak_bytes: int
    max_completion: int
    max_generations: int
    frontier: list[tuple[int, int]]
    vllm_bytes: int = 0

    def to_json(self) -> dict:
        return {"adapter": self.adapter, "generation": self.generation, "vllm_share": self.vllm_share,
                "usable_bytes": self.usable_bytes, "fits": self.fits, "peak_bytes": self.peak_bytes,
                "vllm_bytes": self.vllm_bytes,
                "max_completion": self.max_completion, "max_generations": self.max_generations,
                "frontier": [list(x) for x in self.frontier]}


@dataclass
class GenerationLimits:
    """``fit --method grpo``'s answer: per adapter and engine, the largest G x completion that fits the card.

    Each configuration generates one prompt's group at a time: micro-batch 1, ``grad_accum = G``
    (TRL's ``steps_per_generation`` = G: a generation batch of G completions), the prompt ``prompt``
    tokens, gradient checkpointing on (GRPOConfig's default), the fit's optimizer and precision.
    """

    gpu: str
    capacity_bytes: int
    num_generations: int
    completion: int
    prompt: int
    rows: list[LimitRow]
    assumptions: list[str]

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "capacity_bytes": self.capacity_bytes, "num_generations": self.num_generations,
                "completion": self.completion, "prompt": self.prompt, "rows": [r.to_json() for r in self.rows],
                "assumptions": list(self.assumptions)}

    def lines(self) -> list[str]:
        gib = 1024 ** 3
        out = [f"GRPO on {self.gpu} ({self.capacity_bytes / gib:.1f} GiB), prompt {self.prompt} tokens, "
               f"G = {self.num_generations} x completion {self.completion} requested:"]
        for r in self.rows:
            head = f"  {r.adapter:5s} "
            if r.generation == "vllm-colocate":
                share = r.vllm_share * self.capacity_bytes
                head += (f"vLLM colocated ({r.vllm_share:.0%} of the card): training step {r.peak_bytes / gib:.1f} GiB "
                         f"of the {r.usable_bytes / gib:.1f} GiB left; vLLM needs {r.vllm_bytes / gib:.1f} GiB of its "
                         f"{share / gib:.1f} GiB")
            else:
                head += f"transformers generate: {r.peak_bytes / gib:.1f} GiB of {r.usable_bytes / gib:.1f} GiB"
            front = ", ".join(f"G {g}: {c}" for g, c in r.frontier) or "nothing fits"
            out.append(f"{head} -> {'fits' if r.fits else 'does not fit'}; longest completion at G "
                       f"{self.num_generations}: {r.max_completion or 'none'}; largest G at completion {self.completion}: "
                       f"{r.max_generations or 'none'}; longest completion per G: {front}")
        return out + [f"  ({a})" for a in self.assumptions]


def vllm_bytes(spec, adapter: str, sequences: int, tokens: int) -> int:
    """What colocated vLLM needs in its share of the card (bytes): the policy's weights as TRL loads them into
    vLLM (``LLM(model=..., quantization="bitsandbytes")`` when the policy is 4-bit: NF4 linears at 0.5 B
    plus fp32 absmax per 64 weights, the rest 16-bit; else 16-bit) and the KV cache of ``sequences`` sequences of
    ``tokens`` tokens generated together (16-bit). vLLM's CUDA graphs and sampler buffers are not counted.
    Source: trl/generation/vllm_generation.py (TRL v1.9.0)."""
    if Adapter(adapter).quantized_base:
        weights = spec.linear_params * (0.5 + 4 / 64) + (spec.params - spec.linear_params) * 2
    else:
        weights = spec.params * 2
    kv = sequences * tokens * 2 * spec.num_layers * spec.kv_dim * 2
    return int(weights + kv)


def colocated_need(spec, cfg) -> tuple[int, int]:
    """Colocated vLLM (:func:`vllm_bytes`, bytes): its weights alone, and with the KV cache of ``cfg``'s generation
    batch (``(0, 0)`` when vLLM is not colocated)."""
    gs = settings(cfg)
    if gs.generation != "vllm-colocate":
        return 0, 0
    return (vllm_bytes(spec, cfg.adapter, 0, 0),
            vllm_bytes(spec, cfg.adapter, gs.generation_batch, gs.prompt + gs.completion))


def _device_total(spec, cfg, card, totals) -> int:
    from ..planner.limits import device_totals

    return int(np.ceil(float(device_totals(spec, cfg, card, totals=totals))))


def _longest(fits, lo: int, hi: int, step: int) -> int:
    """The largest ``x`` in ``lo, lo + step, ..., hi`` with ``fits(x)`` (monotone: fits below a limit), or 0."""
    if hi < lo or not fits(lo):
        return 0
    a, b = 0, (hi - lo) // step  # fits(lo + a*step) holds
    while a < b:
        mid = (a + b + 1) // 2
        if fits(lo + mid * step):
            a = mid
        else:
            b = mid - 1
    return lo + a * step


def generation_limits(spec, cfg, card, adapters: tuple[str, ...] = ("lora", "qlora"),
                      share: float | None = None) -> GenerationLimits:
    """The largest G x completion of GRPO on ``card``, for each adapter of ``adapters`` with transformers'
    ``generate`` and with vLLM colocated at ``share`` of the card (default the config's
    ``vllm_gpu_memory_utilization``, TRL's 0.3). ``cfg`` gives G, the completion, the prompt (``seq`` less
    the completion) and the optimizer/precision; every configuration is micro-batch 1, ``grad_accum = G``,
    gradient checkpointing on. Device totals as ``estimate`` computes them (vramplan.planner.limits), against
    the card's capacity less vLLM's share (no margin).
    """
    from ..config import make_config
    from ..planner.limits import DeviceTotals

    gs = settings(cfg)
    g0, c0, prompt = gs.num_generations, gs.completion, gs.prompt
    share = gs.vllm_share if share is None else float(share)
    ctx = int(spec.max_position_embeddings)
    totals = DeviceTotals()
    rows = []
    for adapter in adapters:
        for engine in ("transformers", "vllm-colocate"):
            usable = int(card.memory_bytes * (1.0 - (share if engine == "vllm-colocate" else 0.0)))

            def conf(g: int, c: int):
                opts = dict(num_generations=g, completion=c, generation=engine, vllm_gpu_memory_utilization=share)
                return make_config(spec, cfg.method, adapter=adapter, batch=1, seq=prompt + c, grad_accum=g,
                                   grad_ckpt=True, optimizer=cfg.optimizer, precision=cfg.precision, attn=cfg.attn,
                                   framework=cfg.framework, method_options=opts)

            room = card.memory_bytes * share if engine == "vllm-colocate" else None

            def fits(g: int, c: int) -> bool:
                gc = conf(g, c)
                if room is not None and colocated_need(spec, gc)[1] > room:
                    return False
                return _device_total(spec, gc, card, totals) <= usable

            asked = conf(g0, c0)
            peak = _device_total(spec, asked, card, totals)
            max_c = _longest(lambda c: fits(g0, c), COMPLETION_STEP, ctx - prompt, COMPLETION_STEP)
            gs_ok = [g for g in G_GRID if fits(g, c0)]
            frontier = []
            for g in G_GRID:
                c = _longest(lambda c: fits(g, c), COMPLETION_STEP, ctx - prompt, COMPLETION_STEP)
                if not c:
                    break
                frontier.append((g, c))
            need = colocated_need(spec, asked)[1] if room is not None else 0
            rows.append(LimitRow(adapter=adapter, generation=engine, vllm_share=share if engine == "vllm-colocate" else 0.0,
                                 usable_bytes=usable, fits=peak <= usable and (room is None or need <= room),
                                 peak_bytes=peak, max_completion=max_c, max_generations=max(gs_ok) if gs_ok else 0,
                                 frontier=frontier, vllm_bytes=need))
    notes = ["micro-batch 1 completion, grad_accum = G (one prompt's group per generation), gradient checkpointing "
             f"on, {cfg.optimizer}, {cfg.precision}; device totals as estimate computes them, no margin",
             "vLLM colocated: its share of the card must hold its own weights (4-bit with QLoRA, else 16-bit) and the "
             "generation batch's KV cache; the training step (and the scoring forwards) must fit in the rest"]
    return GenerationLimits(gpu=card.name, capacity_bytes=int(card.memory_bytes), num_generations=g0, completion=c0,
                            prompt=prompt, rows=rows, assumptions=notes)


class GRPO(Behaviour):
    options = (NUM_GENERATIONS, COMPLETION, BETA, LOSS_TYPE, STEPS_PER_GENERATION, NUM_ITERATIONS, GENERATION,
               VLLM_SHARE)
    generates = True
    step = "vramplan.runtime.steps:grpo_step"
    takes_adapter_choice = True
    trainer_names = ("GRPOConfig", "GRPOTrainer")
    axolotl_rl = ("grpo",)
    report_names = ("grpo",)
    config_keys = frozenset({"num_generations", "max_completion_length", "steps_per_generation", "use_vllm",
                             "vllm_mode", "vllm_gpu_memory_utilization", "num_iterations", "epsilon_high"})

    def resolve_options(self, values: dict[str, Any], seq: int) -> dict[str, Any]:
        """GRPO's options with TRL's defaults; the completion at most ``seq - 1`` tokens.

        Raises:
            VramplanError: a completion that leaves no prompt.
        """
        out = super().resolve_options(values, seq)
        comp = out["completion"] if out["completion"] is not None else default_completion(seq)
        if not 0 < comp < seq:
            raise VramplanError(f"GRPO needs 0 < completion tokens < --seq ({seq}), got {comp}",
                                "--seq is prompt + completion tokens; raise --seq or lower --completion")
        out["completion"] = comp
        return out

    def generation(self, cfg: Any, seq: Any = None) -> Generation:
        """The completions of one micro-batch: ``batch`` of them on average, generated together with the rest of
        the generation batch (``shared_by`` = steps per generation); the old/reference scoring forwards."""
        s = cfg.seq if seq is None else seq
        comp = cfg.option("completion")
        gs = settings(cfg)
        extra = dict(shared_by=gs.steps_per_generation, scoring_forwards=gs.buffers)
        if isinstance(s, (int, np.integer)):
            c = min(int(comp), int(s) - 1) if comp is not None else default_completion(int(s))
            return Generation(prompt_tokens=int(s) - c, generated_tokens=c, **extra)
        sv = np.asarray(s, dtype=np.float64)
        c = np.minimum(float(comp), sv - 1) if comp is not None else default_completion(sv)
        return Generation(prompt_tokens=sv - c, generated_tokens=c, **extra)

    def min_seq(self) -> int:
        return 256  # a prompt and a completion of at least 128 tokens each

    def step_terms(self, model: Any, cfg: Any, terms: Any, batch: Any, seq: Any) -> Any:
        return grpo_terms(model, cfg, terms, batch, seq)

    def recipe_for(self, recipe: Any, cfg: Any) -> Any:
        """With ``beta > 0`` and full training TRL's GRPOTrainer loads the reference as a second model
        (``create_model_from_path(model_id, **model_init_kwargs)``: the policy's loading arguments, prepared by
        accelerate in evaluation mode on the same device, TRL v1.9.0 ``GRPOTrainer.__init__``): a frozen copy
        held beside the policy. With PEFT the reference is the policy with its adapter disabled (no copy)."""
        from dataclasses import replace

        beta = float(cfg.option("grpo_beta", BETA.default) or 0.0)
        if beta <= 0 or recipe.adapter.is_peft or any(c.role is Role.REFERENCE for c in recipe.copies):
            return recipe
        ref = ModelCopy(role=Role.REFERENCE, adapter=None, quantized=False, head="lm", forward=Forward.NO_GRAD)
        return replace(recipe, copies=recipe.copies + (ref,))

    def assumptions(self, cfg: Any) -> list[str]:
        gs = settings(cfg)
        out = [f"GRPO as TRL v1.9.0 GRPOTrainer: prompt {gs.prompt} + completion {gs.completion} tokens; "
               f"G = {gs.num_generations}; micro-batch {cfg.batch} completions; generation batch "
               f"{gs.generation_batch} completions ({gs.steps_per_generation} steps per generation); "
               f"beta {gs.beta:g} (TRL's default 0.0 since v0.19: "
               + ("no reference" if not gs.beta else "reference = the policy with its adapter disabled"
                  if cfg.recipe.adapter.is_peft else "reference = a second, frozen model loaded with the policy's "
                  "model_init_kwargs on the same device, in the frozen weights' dtype")
               + f"); loss_type {gs.loss_type} (every loss type reduces batch x completion tensors: the same memory)"
               + ("; old-policy log-probs kept" if gs.old_logps else "")]
        if gs.raised_from:
            out.append(f"GRPO: TRL's steps_per_generation = --grad-accum ({gs.raised_from}) would not hold whole groups "
                       f"of {gs.num_generations}; planned with {gs.steps_per_generation} (TRL refuses the former: set "
                       f"--grad-accum {gs.steps_per_generation} or steps_per_generation)")
        if gs.generation == "vllm-colocate":
            out.append(f"GRPO: vLLM colocated holds vllm_gpu_memory_utilization = {gs.vllm_share:g} of the card "
                       "(its weights and KV cache, outside these tensors): the training step is planned in the rest")
        elif gs.generation == "vllm-server":
            out.append("GRPO: generation on a separate vLLM server: no generation memory on the training card")
        if not cfg.grad_ckpt:
            out.append("GRPO: TRL's GRPOConfig turns gradient checkpointing on by default; this plan has it off (--grad-ckpt)")
        return out

    def dryrun_assumptions(self, cfg: Any) -> list[str]:
        return ["GRPO as TRL v1.9.0 (generate without autocast, decode loop shortcut to its last two steps with the "
                "cache pre-grown; scoring and loss on completion + 1 logits); the dry run traces at most 2 micro-batches: "
                "the generation batch follows --steps-per-generation or that --grad-accum"]

    def limits(self, spec: Any, cfg: Any, card: Any) -> GenerationLimits:
        return generation_limits(spec, cfg, card)

    def request_from_config(self, data: Any, notes: list[str]) -> dict[str, Any]:
        """GRPOConfig (or Axolotl's ``trl:``) keys: the options by their TRL names; ``use_vllm`` + ``vllm_mode`` as
        ``generation``; the sequence as ``max_prompt_length + max_completion_length`` when a config still names
        both (TRL < 0.28), else the prompt is left to ``--seq``."""
        get = data.get if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
        out = super().request_from_config(data, notes)
        opts = dict(out.get("method_options", {}))
        opts.pop("generation", None)
        use_vllm = get("use_vllm", None)
        if use_vllm is not None:
            on = use_vllm if isinstance(use_vllm, bool) else str(use_vllm).strip().lower() in ("1", "true", "yes", "on")
            if on:
                mode = str(get("vllm_mode", None) or "colocate").lower()
                opts["generation"] = f"vllm-{mode}"
                notes.append(f"use_vllm: generation by vLLM ({mode})")
        prompt, comp = get("max_prompt_length", None), get("max_completion_length", None)
        if prompt and comp:
            out["seq"] = int(prompt) + int(comp)
            notes.append(f"GRPO sequence = max_prompt_length {int(prompt)} + max_completion_length {int(comp)}")
        elif comp:
            notes.append("GRPO: no max_prompt_length (removed in TRL 0.28): the prompt is --seq less the completion")
        if get("gradient_checkpointing", None) is None and get("activation_checkpointing", None) is None:
            out["grad_ckpt"] = True
            notes.append("gradient_checkpointing not given: GRPOConfig's default (on)")
        if opts:
            out["method_options"] = opts
        return out

    def card_share(self, cfg: Any) -> float:
        """The share of the card another engine holds outside this process's tensors (colocated vLLM)."""
        gs = settings(cfg)
        return gs.vllm_share if gs.generation == "vllm-colocate" else 0.0

    def card_share_need(self, spec: Any, cfg: Any) -> tuple[int, int]:
        """:func:`colocated_need`: what fit's limits hold vLLM to, held by ``estimate`` too."""
        return colocated_need(spec, cfg)


BEHAVIOUR = GRPO()
