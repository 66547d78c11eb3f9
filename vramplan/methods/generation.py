"""Shared accounting of what a step generates (PPO's rollout; GRPO's completions reuse it).

A generating behaviour returns a :class:`~vramplan.methods.base.Generation` from its
``generation`` hook; these helpers turn the method's options and the sequence length into
the prompt and generated token counts that memory.py (KV cache, rollout logits),
throughput.py (prefill + decode time and FLOPs) and activations.py read. Numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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
