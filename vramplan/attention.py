"""The attention implementations the planner offers, as definitions whose attributes callers read.

* ``eager``: the model's own attention (transformers ``attn_implementation="eager"``): the scores
  and the fp32 softmax are materialised per layer.
* ``sdpa``: PyTorch ``scaled_dot_product_attention``, the default of transformers and of the planner.
* ``flash``: flash-attn 2 (``attn_implementation="flash_attention_2"``), on cards that run it. On
  such a card it runs the same fused kernels as SDPA's flash backend, so it ties ``sdpa`` in memory
  and speed: listings show ``sdpa`` only (``fit --top``; ``--json`` keeps both).

A caller asks a definition (:func:`attention_kernel`) rather than comparing names, so a listing or a
rendering learns of a new implementation from here. Numpy-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import unknown


@dataclass(frozen=True)
class AttentionKernel:
    """One attention implementation."""

    name: str
    default: bool = False       # what a plan runs when none is asked for (renderings leave it unsaid)
    same_as: str | None = None  # ties this implementation exactly (memory and speed): listings show that one


#: every attention implementation the planner offers, by name
KERNELS: dict[str, AttentionKernel] = {k.name: k for k in (
    AttentionKernel("eager"),
    AttentionKernel("sdpa", default=True),
    AttentionKernel("flash", same_as="sdpa"),
)}


def attention_kernel(name: str) -> AttentionKernel:
    """The definition of attention implementation ``name`` (``eager``, ``sdpa``, ``flash``).

    Raises:
        UnknownNameError: ``name`` is not one (a resolved config always holds one: ``vramplan.request`` checks it).
    """
    try:
        return KERNELS[name]
    except KeyError:
        raise unknown("attention implementation", str(name), list(KERNELS)) from None
