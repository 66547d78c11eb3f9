"""Liger's fused linear cross-entropy, reimplemented in plain torch for the dry run (``liger_ce``).

**Emulated, not traced.** Liger-Kernel (``liger-kernel`` 0.8.5 on PyPI) computes the loss
with Triton kernels and its dispatcher has no PyTorch fallback (``liger_kernel/backends/
dispatch.py``: "the dispatcher does not silently fall back to PyTorch reference code"); on a
machine without a GPU ``LigerFusedLinearCrossEntropyLoss`` stops at Triton's driver
(``RuntimeError: 0 active drivers ([]). There should only be one.``). This module keeps the
allocations of its Triton path, read from ``liger_kernel/ops/fused_linear_cross_entropy.py``
(``fused_linear_cross_entropy_forward`` / ``_backward``) and
``liger_kernel/transformers/model/loss_utils.py`` (``LigerForCausalLMLoss``), without its code:

* the labels are padded with the ignore index and shifted (``F.pad(labels, (0, 1))[..., 1:]``),
  the hidden states flattened to ``[BT, H]``;
* chunk rows: ``inc_factor = ceil(V / H)``, ``chunk_size = min(next_pow2(ceil(BT / inc_factor)),
  BT)`` -- each chunk's logits are about as large as the hidden states;
* allocated in forward: ``grad_input = zeros_like(hidden)``, ``grad_weight = zeros_like(weight)``
  when the head trains, ``loss_1d`` (fp32 ``[BT]``); per chunk the logits ``x_chunk @ W.T``
  (the autocast dtype under autocast: the forward is ``custom_fwd`` without ``cast_inputs``),
  overwritten in place by the cross-entropy kernel with ``(softmax - onehot) / n`` (the kernel
  keeps its fp32 running max and sum in registers), then ``grad_input[chunk] = grad_logits @ W``
  and ``grad_weight += grad_logits.T @ x_chunk`` (sm80+: ``addmm(out_dtype=float32)`` in place);
* saved for backward: ``grad_input`` and ``grad_weight`` only -- no logits; backward scales
  them in place by the incoming gradient (``element_mul_kernel``).

Not emulated: Liger's other kernels (RMSNorm, SwiGLU, RoPE: ``apply_liger_kernel_to_*``
patches those too; here the model keeps transformers' own), logit soft-capping.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
SOURCES = (
    "liger_kernel/ops/fused_linear_cross_entropy.py (0.8.5): chunk size, grad_input/grad_weight computed in forward, "
    "logits chunk overwritten by its gradient",
    "liger_kernel/transformers/model/loss_utils.py LigerForCausalLMLoss: label shift by padding, no logits returned",
    "liger_kernel/backends/dispatch.py: no PyTorch fallback (Triton needs a GPU driver)",
)


def chunk_rows(tokens: int, hidden: int, vocab: int) -> int:
    """Liger's chunk size: ``min(next_pow2(ceil(BT / ceil(V / H))), BT)`` rows."""
    inc = max(1, math.ceil(vocab / hidden))
    rows = 1 << max(0, math.ceil(tokens / inc) - 1).bit_length()
    return max(1, min(rows, tokens))


def _cross_entropy_rows_(logits: torch.Tensor, target: torch.Tensor, loss_out: torch.Tensor, scale,
                         ignore_index: int) -> None:
    """The cross-entropy kernel on ``logits`` ``[rows, V]``: loss per row into ``loss_out`` and
    ``(softmax - onehot) * scale`` over ``logits`` in place (ignored rows: zero), with no
    ``[rows, V]`` temporary."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    picked = logits.gather(1, safe).squeeze(1).float()
    m = logits.amax(dim=1, keepdim=True)
    logits.sub_(m).exp_()
    s = logits.sum(dim=1, keepdim=True, dtype=torch.float32)
    lse = s.log().squeeze(1) + m.squeeze(1).float()
    loss_out.copy_((lse - picked) * valid * scale)
    logits.div_(s)
    logits.scatter_add_(1, safe, -valid.unsqueeze(1).to(logits.dtype))
    logits.mul_((valid.unsqueeze(1) * scale).to(logits.dtype))


class FusedLinearCrossEntropy(torch.autograd.Function):
    """``mean(cross_entropy(x @ W.T, target))`` with the gradients computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX):
        tokens, hidden = x.shape
        vocab = weight.shape[0]
        rows = chunk_rows(tokens, hidden, vocab)
        grad_input = torch.zeros_like(x)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        loss_1d = torch.zeros(tokens, dtype=torch.float32, device=x.device)
        n = (target != ignore_index).sum().clamp_min(1)
        scale = 1.0 / n.float()
        for start in range(0, tokens, rows):
            end = min(start + rows, tokens)
            x_chunk = x[start:end]
            logits = x_chunk @ weight.t()
            _cross_entropy_rows_(logits, target[start:end], loss_1d[start:end], scale, ignore_index)
            grad_input[start:end] = logits @ weight
            if grad_weight is not None:
                if grad_weight.dtype is torch.float32 and logits.dtype is not torch.float32 and x.is_meta:
                    torch.addmm(grad_weight, logits.t(), x_chunk.to(logits.dtype), out_dtype=torch.float32,
                                out=grad_weight)  # Liger's sm80+ path: accumulate in fp32, in place
                else:
                    grad_weight.addmm_(logits.t().to(grad_weight.dtype), x_chunk.to(grad_weight.dtype))
            del logits, x_chunk
        loss = loss_1d.sum()
        ctx.save_for_backward(grad_input, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, grad_weight = ctx.saved_tensors
        grad_input.mul_(grad_output.to(grad_input.dtype))  # element_mul_kernel, in place
        if grad_weight is not None:
            grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_input, grad_weight, None, None


def causal_lm_loss(hidden_states: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``LigerForCausalLMLoss``: shift the labels by padding, flatten, fused linear cross-entropy (mean)."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
    shift_labels = labels[..., 1:].contiguous().view(-1)
    x = hidden_states.contiguous().view(-1, hidden_states.shape[-1])
    return FusedLinearCrossEntropy.apply(x, lm_head_weight, shift_labels, ignore_index)
