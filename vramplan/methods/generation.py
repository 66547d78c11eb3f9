"""Shared accounting of what a step generates (PPO's rollout; GRPO's completions reuse it).

A generating behaviour returns a :class:`~vramplan.methods.base.Generation` from its
``generation`` hook; these helpers turn the method's options and the sequence length into
the prompt and generated token counts that memory.py (KV cache, rollout logits),
throughput.py (prefill + decode time and FLOPs) and activations.py read. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..precision import DTYPE_BYTES
from .base import Generation


def split_sequence(seq: Any, generated: int | None) -> Generation:
    """A sequence of ``seq`` tokens split into a prompt and ``generated`` tokens (None: half the sequence).

    ``seq`` an int: ``generated`` defaults to ``seq // 2`` (an int, as make_config resolves it) and the
    prompt is ``max(seq - generated, 1)``. ``seq`` a numpy grid (a search over lengths): the default is
    ``seq / 2`` per length and a given count is capped at ``seq - 1``, as the analytic model evaluates a
    grid. Units: tokens per generated sequence.
    """
    if isinstance(seq, (int, np.integer)):
        gen = int(generated or seq // 2)
        return Generation(prompt_tokens=max(int(seq) - gen, 1), generated_tokens=gen)
    s = np.asarray(seq, dtype=np.float64)
    gen = np.minimum(float(generated) if generated else s / 2, s - 1)
    return Generation(prompt_tokens=s - gen, generated_tokens=gen)


@dataclass(frozen=True)
class GenerationWork:
    """The work of one step's generation on one GPU (arrays over batch/seq), for throughput.py.

    Attributes:
        generated_tokens: tokens decoded one at a time (per generated sequence), per micro-batch: divided by
            ``shared_by`` when a generation serves several micro-batches (a float then).
        scoring_flops: the no-grad forward over prompt + generated tokens counted with the generation
            (FLOPs; the calibration convention's rollout term).
        prefill_tokens, prefill_flops: the prompt prefill (tokens; FLOPs, compute-bound).
        decode_bytes, decode_flops: all decode steps (bytes read: weights and KV cache so far; FLOPs).
        passes: sequential passes over the layers added (the scoring forward).
        dequant_passes: NF4 dequantisations of the base per step added (scoring + one per decoded token).
    """

    generated_tokens: int
    scoring_flops: Any
    prefill_tokens: Any
    prefill_flops: Any
    decode_bytes: Any
    decode_flops: Any
    passes: int
    dequant_passes: int


def generation_work(spec, regime, policy, gen: Generation, batch, seq, fwd_mm) -> GenerationWork:
    """Prefill and decode work of ``gen`` (TRL ``generate`` with a KV cache) over ``batch`` x ``seq``.

    ``fwd_mm`` is the policy's matmul FLOPs per token (2 x (body + vocab x hidden)). Each of the
    ``batch x gen.sequences_per_example`` generated sequences prefills ``seq - generated`` prompt
    tokens (at least 1), then decodes ``generated`` tokens, each reading the policy's weights
    (full: trainable dtype; QLoRA: NF4 + the rest in fp32, bitsandbytes dequantising per token
    unless one sequence decodes; else the frozen dtype) and the KV cache so far (compute dtype).
    A generation serving ``gen.shared_by`` micro-batches (GRPO's generation batch) decodes them together:
    each decode step's weight reads (and QLoRA's dequantisation) are shared, so a micro-batch carries
    ``1 / shared_by`` of them; ``gen.scoring_forwards`` no-grad forwards over the sequence are counted with it.
    Source: the roofline of HF ``generate`` as PPO's rollout runs it (vramplan.throughput).
    """
    L = spec.num_layers
    b = np.asarray(batch, dtype=np.float64) * gen.sequences_per_example
    s = np.asarray(seq, dtype=np.float64)
    g = int(gen.generated_tokens)
    scoring = fwd_mm * b * s * gen.scoring_forwards
    share = max(int(gen.shared_by), 1)
    prompt = np.maximum(s - g, 1)
    prefill_tokens = b * prompt
    prefill = (fwd_mm + 4 * prompt * spec.q_dim * L) * prefill_tokens
    if policy.adapter is not None and not policy.adapter.is_peft:
        wbytes = spec.params * DTYPE_BYTES[regime.trainable_dtype]
    elif policy.quantized:
        nf4 = spec.linear_params
        per = np.where(b * share > 1, 4.5, 0.5)  # bnb dequantises per token unless decoding one sequence
        wbytes = nf4 * per + (spec.params - nf4) * 4
    else:
        wbytes = spec.params * DTYPE_BYTES[regime.frozen_dtype]
    kv_per_token = 2 * L * spec.kv_dim * DTYPE_BYTES[regime.compute_dtype]
    ctx = g * prompt + g * (g - 1) / 2.0  # cached positions read over the whole generation
    # decode steps per micro-batch (their kernel launches): a generation shared by micro-batches runs once for all
    steps = g if share == 1 else g / share
    return GenerationWork(generated_tokens=steps, scoring_flops=scoring, prefill_tokens=prefill_tokens,
                          prefill_flops=prefill, decode_bytes=g * wbytes / share + b * ctx * kv_per_token,
                          decode_flops=g * b * fwd_mm + 4 * spec.q_dim * L * b * ctx, passes=gen.scoring_forwards,
                          dequant_passes=gen.scoring_forwards + (g if share == 1 else g / share))
