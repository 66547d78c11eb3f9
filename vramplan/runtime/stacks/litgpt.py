"""The litgpt stack (``--framework litgpt``): its own model, adapters, loss and step.

It follows the finetune scripts (``litgpt/finetune/lora.py`` and ``full.py``, litgpt 0.5): ``GPT(config)`` (the
LoRA ``GPT`` with ``lora_query``/``lora_key``/``lora_value``/``lora_projection``/
``lora_mlp``) initialised in the precision's dtype as ``fabric.init_module`` does
(``bf16-true``: everything bf16; ``bf16-mixed``: fp32 under autocast, outputs converted to
fp32 as Fabric's ``convert_output``), ``mark_only_lora_as_trainable``,
``model.max_seq_length = seq``; LoRA: ``logits = model(ids, lm_head_chunk_size=128)``,
``logits[-1] = logits[-1][..., :-1, :]``, ``chunked_cross_entropy(logits, targets[..., 1:])``;
full: ``chunked_cross_entropy(model(ids)[..., :-1, :], targets[..., 1:])``; the logits stay
alive through backward (they are not deleted); ``torch.optim.AdamW`` (foreach on CUDA), no
clipping (``max_norm: None``), ``zero_grad()``.
"""

from __future__ import annotations

import torch

from ...errors import VramplanError
from ...methods import Adapter, Role
from ...taxonomy import Phase
from .common import OwnLoopStack, default_dtype, norm_eps, rope_scaling, rope_theta, split_targets, token_ids

#: HF attention module names -> litgpt's LoRA flags
_LIT_ATTN = {"q_proj": "lora_query", "k_proj": "lora_key", "v_proj": "lora_value", "o_proj": "lora_projection"}
#: the precision regimes the dry run runs litgpt in (Fabric's bf16-true, bf16-mixed, 32-true)
_PRECISIONS = ("bf16", "bf16-mixed", "fp32")
_FABRIC_DTYPE = {"bfloat16": "bf16", "float16": "16", "float32": "32"}


def fabric_precision(regime) -> str:
    """Fabric's name for ``regime``: ``<autocast>-mixed`` under autocast, else ``<compute dtype>-true``."""
    if regime.autocast:
        return f"{_FABRIC_DTYPE[regime.autocast]}-mixed"
    return f"{_FABRIC_DTYPE[regime.compute_dtype]}-true"


class LitgptRuntime(OwnLoopStack):
    name = "litgpt"
    package = extra = "litgpt"
    adapters = (Adapter.FULL, Adapter.LORA)

    def check_stack(self, spec, cfg, hint: str) -> None:
        if spec.model_type not in ("llama", "mistral", "qwen2"):
            raise VramplanError(f"the litgpt dry run builds llama, mistral and qwen2 models, not {spec.model_type}",
                                hint)
        if cfg.precision not in _PRECISIONS:
            raise VramplanError(f"the litgpt dry run runs bf16-true, bf16-mixed and 32-true, not {cfg.precision}",
                                "use --precision bf16")
        if cfg.grad_ckpt:
            raise VramplanError("litgpt's finetune scripts have no gradient checkpointing", "use --no-grad-ckpt")
        if cfg.recipe.adapter.is_peft:
            split_targets(cfg, _LIT_ATTN, self.name)

    def build_stack(self, t) -> None:
        _build_litgpt(t)


def _litgpt_config(spec, cfg):
    """litgpt's ``Config`` for ``spec``: its own catalogue entry when it has the HF id, else mapped."""
    from litgpt.config import Config as BaseConfig
    from litgpt.lora import Config as LoRAConfig

    lora = cfg.recipe.adapter.is_peft
    cls = LoRAConfig if lora else BaseConfig
    extra = {}
    if lora:
        attn, mlp = split_targets(cfg, _LIT_ATTN, "litgpt")
        extra = dict(lora_r=int(cfg.rank), lora_alpha=int(cfg.alpha), lora_dropout=float(cfg.dropout),
                     lora_mlp=mlp, lora_head=False,
                     **{a: a in attn for a in ("lora_query", "lora_key", "lora_value", "lora_projection")})
    conf = None
    if spec.hf_id:
        try:
            conf = cls.from_name(spec.hf_id, **extra)
        except (ValueError, TypeError):
            conf = None
    if conf is not None and (conf.n_embd, conf.n_layer, conf.vocab_size, conf.n_query_groups) == (
            spec.hidden_size, spec.num_layers, spec.vocab_size, spec.num_kv_heads):
        return conf, f"litgpt Config.from_name({spec.hf_id!r})"
    rs = rope_scaling(spec)
    adjustments = None
    if rs.get("rope_type", rs.get("type")) == "llama3":
        adjustments = dict(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                           high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_seq_len=int(rs["original_max_position_embeddings"]))
    conf = cls(name=spec.name, block_size=int(spec.max_position_embeddings), vocab_size=int(spec.vocab_size),
               padded_vocab_size=int(spec.vocab_size), n_layer=int(spec.num_layers), n_head=int(spec.num_heads),
               n_embd=int(spec.hidden_size), head_size=int(spec.head_dim), n_query_groups=int(spec.num_kv_heads),
               rotary_percentage=1.0, parallel_residual=False, bias=False, attn_bias=bool(spec.qkv_bias),
               norm_class_name="RMSNorm", norm_eps=norm_eps(spec), mlp_class_name="LLaMAMLP",
               intermediate_size=int(spec.intermediate_size), rope_base=int(rope_theta(spec)),
               rope_adjustments=adjustments, **extra)
    return conf, "litgpt Config mapped from the HF config"


def _build_litgpt(t) -> None:
    from ..build import Copy, make_optimizer, torch_dtype

    cfg, spec = t.cfg, t.spec
    lora = cfg.recipe.adapter.is_peft
    conf, origin = _litgpt_config(spec, cfg)
    if lora:
        from litgpt.lora import GPT, mark_only_lora_as_trainable
    else:
        from litgpt.model import GPT
    # fabric.init_module: bf16-true initialises in bf16; *-mixed and 32-true in fp32
    dtype = torch.float32 if t.regime.autocast else torch_dtype(t.regime.frozen_dtype)  # (32-true: frozen fp32)
    dev = t.tensor_device
    with default_dtype(dtype), torch.device(dev):
        model = GPT(conf)
    if lora:
        mark_only_lora_as_trainable(model)
    model.max_seq_length = int(cfg.seq)  # finetune: the longest sequence (re-sizes the RoPE cache)
    model.lm_head.register_forward_pre_hook(t._head_pre_hook)
    model.lm_head.register_forward_hook(t._head_post_hook)
    model.train()
    t.copies[Role.POLICY] = Copy(Role.POLICY, cfg.recipe.copies[0], model, trains=True)
    t.optimizer = make_optimizer(t.trainable_parameters(), cfg, t.regime, t.device, t.fake, t.notes)
    t.run = _litgpt_step
    prec = fabric_precision(t.regime)
    t.notes.append(f"litgpt {RUNTIME.package_version()}: {origin}, precision {prec}, "
                   + ("lm_head_chunk_size=128, " if lora else "") + "chunked_cross_entropy(chunk_size=128), "
                   f"{type(t.optimizer).__name__}")


def _fabric_output(t, out):
    """Fabric's ``MixedPrecision.convert_output``: floating outputs to the default dtype (fp32)."""
    if t.regime.autocast is None:
        return out
    if isinstance(out, list):
        return [o.to(torch.float32) if o.is_floating_point() else o for o in out]
    return out.to(torch.float32)


def _litgpt_step(t) -> dict:
    from litgpt.utils import chunked_cross_entropy

    cfg, model = t.cfg, t.policy
    lora = cfg.recipe.adapter.is_peft
    last = None
    for _ in range(cfg.grad_accum):
        t.hooks.phase(Phase.FORWARD)
        input_ids = token_ids(t, cfg.batch, cfg.seq)
        targets = input_ids.clone()
        with t.amp():
            logits = model(input_ids, lm_head_chunk_size=128) if lora else model(input_ids)
        logits = _fabric_output(t, logits)
        if lora:
            logits[-1] = logits[-1][..., :-1, :]  # shift: output n predicts token n+1
            loss = chunked_cross_entropy(logits, targets[..., 1:])
        else:
            loss = chunked_cross_entropy(logits[..., :-1, :], targets[..., 1:])
        t.logits_done()
        t.hooks.phase(Phase.BACKWARD)
        t.backward(loss / cfg.grad_accum)  # fabric.backward; `logits` is still referenced here
        last = loss.detach()
        del loss, logits, input_ids, targets
        t.hooks.event("after_backward", t)
    t.hooks.phase(Phase.OPTIMIZER_STEP)
    t.optimizer.step()
    t.hooks.event("after_optimizer_step", t)
    t.optimizer.zero_grad()
    t.hooks.event("step_end", t)
    return {"loss": last}


RUNTIME = LitgptRuntime()
