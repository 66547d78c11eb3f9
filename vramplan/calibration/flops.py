"""FLOPs and sequential passes of one training step: the regressors of the step-time model.

The profile's achieved TFLOP/s and step-time model are defined against these counts; a
planner that predicts step time from a profile must count FLOPs the same way
(:func:`step_shape`). No torch import.

Sources and conventions:
* Matmul FLOPs per token of a forward: 2 per weight touched (multiply + add), over the
  decoder-layer linears (routed experts only for MoE) and the LM head (tied or not: it is a
  matmul either way). A scalar head (reward/value models) is ``hidden`` weights.
* Attention score and value matmuls: 4 * seq * (heads * head_dim) per token and layer in a
  forward, the PaLM convention (Chowdhery et al. 2022, Appendix B: 6N + 12 L H Q T per
  token for training), without a causal-mask discount.
* Backward: twice the forward for a copy whose weights train (input and weight gradients);
  once the forward when the weights are frozen (input gradients only, PEFT/QLoRA/IA3), but
  attention always twice (gradients w.r.t. Q, K and V). Gradient checkpointing adds a forward.
* PPO (the registry's copies): the rollout generates ``ppo_response`` tokens one at a time
  with the policy after a prefill of the prompt; the reference, reward and value copies and
  the policy each run a no-grad forward over the sequence; then policy and value train.
* DPO: ``sequences_per_example`` = 2 (chosen + rejected, one concatenated batch) through the
  policy (train) and the reference (no-grad forward; with PEFT the adapter-disabled base).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainConfig
from ..methods import Adapter, Forward
from ..models import ModelSpec
from ..profiles import step_features


@dataclass(frozen=True)
class StepShape:
    """What one optimiser step does, in the units of the step-time model."""

    flops: float           # total FLOPs of the step
    tokens: int            # tokens through the trained policy: batch x seq x sequences per example
    layer_passes: int      # sequential passes over the layers (forwards, backwards, recomputes)
    gen_tokens: int        # tokens generated one at a time (PPO)
    layers: int
    hidden: int
    dequant_gparams: float  # NF4 weights dequantised per step, in 1e9 (QLoRA bases)

    def features(self) -> dict[str, float]:
        """The regressors of :class:`vramplan.profiles.Throughput` (passes counted per layer)."""
        return step_features(flops=self.flops, layers=self.layers, hidden=self.hidden, passes=self.layer_passes,
                             gen_tokens=self.gen_tokens)


def _body_params(spec: ModelSpec) -> int:
    """Matmul weights touched per token in the decoder layers (routed experts only for MoE)."""
    return spec.active_params - spec.embedding_params - spec.lm_head_params - spec.num_layers * spec.layer_norm_params() - spec.hidden_size


def step_shape(spec: ModelSpec, cfg: TrainConfig) -> StepShape:
    """FLOPs, passes and dequantised weights of one step of ``cfg`` on ``spec``."""
    recipe = cfg.recipe
    seqs = cfg.batch * recipe.sequences_per_example
    tokens = seqs * cfg.seq
    body = _body_params(spec)
    attn_fwd = 4 * cfg.seq * spec.q_dim * spec.num_layers  # per token
    gc = 1 if cfg.grad_ckpt else 0
    flops = 0.0
    passes = 0
    dequant = 0.0
    quant_linear = spec.linear_params / 1e9
    copies = list(recipe.copies)
    for c in copies:
        head = spec.vocab_size * spec.hidden_size if c.head == "lm" else spec.hidden_size
        fwd_mm = 2 * (body + head)
        fwd = (fwd_mm + attn_fwd) * tokens
        if c.forward is Forward.GRAD:
            full = c.adapter is Adapter.FULL
            bwd = ((2 * fwd_mm if full else fwd_mm) + 2 * attn_fwd) * tokens
            flops += fwd * (1 + gc) + bwd
            passes += 2 + gc
            if c.quantized:
                dequant += quant_linear * (2 + gc)
            if recipe.method.rollout:  # the no-grad scoring forward of a training copy in the rollout
                flops += fwd
                passes += 1
                if c.quantized:
                    dequant += quant_linear
        elif c.forward is Forward.NO_GRAD:
            flops += fwd
            passes += 1
            if c.quantized:
                dequant += quant_linear
    for _role in recipe.shared_roles:  # reference served by the policy's base with the adapter off
        fwd_mm = 2 * (body + spec.vocab_size * spec.hidden_size)
        flops += (fwd_mm + attn_fwd) * tokens
        passes += 1
        if recipe.adapter.quantized_base:
            dequant += quant_linear
    gen = 0
    if recipe.method.rollout:
        gen = int(cfg.ppo_response or cfg.seq // 2)
        # prefill + one token at a time: every token of the sequence goes through the policy once
        fwd_mm = 2 * (body + spec.vocab_size * spec.hidden_size)
        flops += fwd_mm * cfg.batch * cfg.seq
        passes += 1
        if recipe.adapter.quantized_base:
            dequant += quant_linear * (1 + gen)
    return StepShape(flops=float(flops), tokens=int(tokens), layer_passes=int(passes), gen_tokens=gen,
                     layers=spec.num_layers, hidden=spec.hidden_size, dequant_gparams=float(dequant))


def step_flops(spec: ModelSpec, cfg: TrainConfig) -> float:
    """FLOPs of one optimiser step (see the module docstring for what is counted)."""
    return step_shape(spec, cfg).flops
