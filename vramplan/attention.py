"""The attention implementations the planner offers, as definitions whose attributes callers read.

* ``eager``: the model's own attention (transformers ``attn_implementation="eager"``): the scores
  and the fp32 softmax are materialised per layer.
* ``sdpa``: PyTorch ``scaled_dot_product_attention``, the default of transformers and of the planner.
* ``flash``: flash-attn 2 (``attn_implementation="flash_attention_2"``), on cards that run it. On
  such a card it runs the same fused kernels as SDPA's flash backend, so it ties ``sdpa`` in memory
  and speed unless SDPA gets a mask or a composite it does not (a padded batch, a sliding window shorter
  than the sequence, ...: :func:`vramplan.memory.ties_stand_in`); where they tie listings show ``sdpa``
  only (``fit --top``; ``--json`` keeps both).

A caller asks a definition (:func:`attention_kernel`, or a config's ``cfg.attention``) what it does --
whether it materialises its scores, goes through torch's SDPA dispatch, handles masks itself, needs a
card feature or a package -- rather than comparing names, so the activation model, the step work, the
card checks, the search, the renderings and the dry run's runtime learn of a new implementation from
here. Numpy-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import unknown


@dataclass(frozen=True)
class AttentionKernel:
    """One attention implementation: what the planning path and the runtime read of it.

    Attributes:
        name: the planner's name (``--attn``).
        hf_name: transformers' ``attn_implementation`` string that builds it (``eager``, ``sdpa``,
            ``flash_attention_2``: transformers ``modeling_utils``
            ``PreTrainedModel._check_and_adjust_attn_implementation``).
        default: what a plan runs when none is asked for (renderings leave it unsaid).
        same_as: ties this implementation (memory and speed) wherever that one builds nothing more
            (:func:`vramplan.memory.ties_stand_in`): there the search evaluates the two once and listings
            show that one.
        materialises_scores: the layer computes ``q k^T`` as a tensor and softmaxes it in fp32
            (transformers ``eager_attention_forward``: ``matmul``, ``softmax(..., dtype=torch.float32)``,
            ``.to(query.dtype)``, ``matmul`` with v): the scores' buffers (bytes per head x query x key
            position) are saved and held per layer, their per-token part reads the tokens (v's bytes), the
            mask is an additive float tensor in the hidden states' dtype, and the step moves those scores
            (``throughput.EAGER_FWD_BYTES``). Else a fused kernel keeps only q, k, v, the output and a
            logsumexp.
        torch_sdpa: the layer calls ``torch.nn.functional.scaled_dot_product_attention``, which picks its
            backend from its inputs (PyTorch ``sdp_utils``: the flash backend takes no explicit mask, 16-bit
            inputs only, equal head counts unless ``enable_gqa``; else the memory-efficient backend, with the
            mask as an additive bias of the query dtype, and without GQA: transformers ``repeat_kv`` copies k
            and v to every head; else the math backend, which materialises the scores). transformers refuses it
            for a model whose class says ``_supports_sdpa = False``.
        handles_masks_itself: the kernel takes no mask tensor: padded batches are unpadded into variable-length
            sequences, the sliding window and causality are kernel arguments, and grouped k/v heads are read in
            place (flash-attn ``flash_attn_varlen_func``, ``window_size``; transformers
            ``integrations/flash_attention.py`` / ``modeling_flash_attention_utils._flash_attention_forward``).
        casts_fp32_inputs: fp32 q, k, v are cast to a 16-bit target dtype before the kernel outside autocast
            (transformers ``integrations/flash_attention.py`` ``get_target_dtype``: a quantised model's
            ``config.dtype``, else its linears' weight dtype), so an fp32 residual stream still runs it.
        needs_card_support: runs only on a card whose ``GPUSpec.flash_attention`` is true (flash-attn 2 supports
            Ampere, Ada and Hopper: compute capability >= 8.0; flash-attn README "Installation and features").
        title: how an error message names it (``FlashAttention-2``).
        package: the distribution that must be installed to run it (``flash-attn``), or None.
        module: that distribution's import name (``flash_attn``), or None.
    """

    name: str
    hf_name: str
    default: bool = False
    same_as: str | None = None
    materialises_scores: bool = False
    torch_sdpa: bool = False
    handles_masks_itself: bool = False
    casts_fp32_inputs: bool = False
    needs_card_support: bool = False
    title: str = ""
    package: str | None = None
    module: str | None = None

    def runs_on(self, gpu) -> bool:
        """Whether ``gpu`` (a :class:`~vramplan.gpus.GPUSpec`) runs this implementation: one that needs card
        support (flash-attn: Ampere or newer) only where the card has it (``GPUSpec.flash_attention``)."""
        return not self.needs_card_support or bool(gpu.flash_attention)

    @property
    def note(self) -> str:
        """How a plan running this implementation is told from one running another (fit's alternatives):
        ``flash: same kernels as sdpa, needs flash-attn``, else ``eager attention``."""
        if self.same_as is not None:
            return f"{self.name}: same kernels as {self.same_as}" + (f", needs {self.package}" if self.package else "")
        return f"{self.name} attention"


#: every attention implementation the planner offers, by name
KERNELS: dict[str, AttentionKernel] = {k.name: k for k in (
    AttentionKernel("eager", "eager", materialises_scores=True),
    AttentionKernel("sdpa", "sdpa", default=True, torch_sdpa=True),
    AttentionKernel("flash", "flash_attention_2", same_as="sdpa", handles_masks_itself=True, casts_fp32_inputs=True,
                    needs_card_support=True, title="FlashAttention-2", package="flash-attn", module="flash_attn"),
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


def searched_kernels(gpu) -> list[str]:
    """The implementations a settings search tries on ``gpu`` when none is asked for, in catalogue order: those
    that do not materialise their scores (eager is planned only when asked for: it never saves memory or time)
    and that the card runs (:meth:`AttentionKernel.runs_on`)."""
    return [k.name for k in KERNELS.values() if not k.materialises_scores and k.runs_on(gpu)]


def default_kernel() -> AttentionKernel:
    """The implementation a plan runs when none is asked for (``sdpa``)."""
    return next(k for k in KERNELS.values() if k.default)


def scores_kernel() -> AttentionKernel:
    """The implementation that materialises its scores (``eager``): what a model or stack computing its scores by
    hand is planned and built as, and what transformers falls back to when it refuses SDPA."""
    return next(k for k in KERNELS.values() if k.materialises_scores)
