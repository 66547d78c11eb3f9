"""The torchtune stack (``--framework torchtune``): its own model, adapters, loss and step.

It follows the single-device recipes (``recipes/lora_finetune_single_device.py`` and
``full_finetune_single_device.py``, torchtune 0.6.1): the family's component builder
(``torchtune.models.<family>._component_builders``: ``llama3``/``llama3_1``/``llama3_2``,
``mistral``, ``qwen2`` and their ``lora_*`` versions with ``use_dora`` and
``quantize_base``, torchao ``NF4Tensor`` for QLoRA) built under
``training.set_default_dtype(dtype)``: one dtype for the model *and* its adapters (bf16);
``set_trainable_params(model, get_adapter_params(model))``;
``training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer})``;
``CEWithChunkedOutputLoss`` with ``model.set_num_output_chunks``; the step shifts the labels
with the ignore-index column (``torch.hstack``), ``logits = model(tokens)``,
``loss = loss_fn(logits, labels)``, ``del logits``, ``(loss * num_tokens).backward()``, and
at the update ``training.scale_grads(model, 1 / num_tokens)``, no clipping
(``clip_grad_norm: null``), ``optimizer.step()``, ``zero_grad(set_to_none=True)``. The
optimiser is the configs' ``torch.optim.AdamW(fused=True)`` (or ``cfg.optimizer``).

``torchtune.training`` is not imported: torchtune 0.6.1's imports
``torchao.quantization.int4_weight_only``, gone from torchao 0.16, and PEFT refuses torchao
older than 0.16, so one environment cannot hold both. Its three helpers the recipes call are
one-liners, called here as they are written: ``set_default_dtype`` (a default-dtype context),
``set_activation_checkpointing`` (torch's ``apply_activation_checkpointing`` with a
``ModuleWrapPolicy``) and ``scale_grads`` (``p.grad *= scaler``).

Gradient checkpointing on ``meta`` goes through :func:`vramplan.runtime.build.checkpoint_fn`
so the recomputation re-enters the dry run's modes (torchtune's own wrappers are kept; only
their checkpoint function is replaced).
"""

from __future__ import annotations

import importlib

import torch

from ...errors import VramplanError
from ...methods import Adapter, Role
from ...taxonomy import Phase
from .common import OwnLoopStack, default_dtype, norm_eps, rope_scaling, rope_theta, split_targets, token_ids, wrap_head

#: HF attention module names -> torchtune's
_TT_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}


class TorchtuneRuntime(OwnLoopStack):
    name = "torchtune"
    package = extra = "torchtune"
    needs = ("torchtune 0.6 imports torchao.dtypes.nf4tensor (torchao < 0.18) and PEFT rejects torchao < 0.16: "
             "torchao >= 0.16, < 0.18")
    submodules = ("torchtune.modules", "torchtune.modules.loss", "torchtune.modules.peft")
    adapters = (Adapter.FULL, Adapter.LORA, Adapter.QLORA, Adapter.DORA)

    def check_stack(self, spec, cfg, hint: str) -> None:
        if spec.head_dim * spec.num_heads != spec.hidden_size:
            raise VramplanError(f"torchtune's builders derive head_dim = hidden / heads = "
                                f"{spec.hidden_size // spec.num_heads}, but {spec.name} has head_dim {spec.head_dim}",
                                hint)
        if spec.model_type not in ("llama", "mistral", "qwen2"):
            raise VramplanError(f"the torchtune dry run builds llama, mistral and qwen2 models, not {spec.model_type}",
                                hint)
        if cfg.regime.autocast is not None:  # bf16 or fp32 throughout, not a mixed regime
            raise VramplanError(f"torchtune recipes train in one dtype (dtype: bf16 or fp32), not {cfg.precision}",
                                "use --precision bf16")
        if cfg.recipe.adapter.is_peft:
            split_targets(cfg, _TT_ATTN, self.name)

    def build_stack(self, t) -> None:
        _build_torchtune(t)


def _torchtune_builder(spec, cfg):
    """The component builder of ``spec``'s family and its arguments (from the HF config)."""
    from ...stacks import torchtune_builder

    family = torchtune_builder(spec, peft=False)  # llama3 / llama3_1 / llama3_2, mistral, qwen2
    kw = dict(vocab_size=int(spec.vocab_size), num_layers=int(spec.num_layers), num_heads=int(spec.num_heads),
              num_kv_heads=int(spec.num_kv_heads), embed_dim=int(spec.hidden_size),
              intermediate_dim=int(spec.intermediate_size), max_seq_len=int(spec.max_position_embeddings),
              norm_eps=norm_eps(spec), rope_base=rope_theta(spec))
    if family.startswith("llama3"):
        rs = rope_scaling(spec)
        if family == "llama3_2":  # Llama 3.2 1B/3B: tied output projection
            kw["tie_word_embeddings"] = True
            kw["scale_factor"] = int(rs.get("factor", 32))
        elif family == "llama3_1":  # llama3-scaled RoPE
            kw["scale_factor"] = int(rs.get("factor", 8))
        kw["rope_base"] = int(kw["rope_base"])
    elif family == "qwen2":
        kw["tie_word_embeddings"] = bool(spec.tie_embeddings)
    else:
        kw["rope_base"] = int(kw["rope_base"])
    mod = importlib.import_module(f"torchtune.models.{family}._component_builders")
    adapter = cfg.recipe.adapter
    if not adapter.is_peft:
        return getattr(mod, family), kw, family
    attn, mlp = split_targets(cfg, _TT_ATTN, "torchtune")
    kw.update(lora_attn_modules=attn, apply_lora_to_mlp=mlp, lora_rank=int(cfg.rank), lora_alpha=float(cfg.alpha),
              lora_dropout=float(cfg.dropout), use_dora=adapter.dora,
              quantize_base=adapter.quantized_base)
    return getattr(mod, "lora_" + family), kw, "lora_" + family


def _build_torchtune(t) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torchtune import modules
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from ..build import Copy, checkpoint_fn, make_optimizer, torch_dtype

    cfg, spec = t.cfg, t.spec
    dtype = torch_dtype(t.regime.frozen_dtype)  # the recipe's one `dtype` (bf16 or fp32)
    builder, kwargs, name = _torchtune_builder(spec, cfg)
    dev = t.tensor_device
    try:
        with default_dtype(dtype), torch.device(dev):
            model = builder(**kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:
        from ..build import first_sentence

        raise VramplanError(f"torchtune cannot build {spec.name} with {name}: {first_sentence(exc)}") from None
    if t.fake:
        _build_rope_caches(model, t.notes)
    if cfg.recipe.adapter.is_peft:
        set_trainable_params(model, get_adapter_params(model))
    if cfg.grad_ckpt:
        # training.set_activation_checkpointing(model, auto_wrap_policy={TransformerSelfAttentionLayer}) is this call
        apply_activation_checkpointing(model, auto_wrap_policy=ModuleWrapPolicy({modules.TransformerSelfAttentionLayer}))
        if t.fake:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

            for m in model.modules():
                if isinstance(m, CheckpointWrapper):  # keep torchtune's wrapper, re-enter our modes on recompute
                    m.checkpoint_fn = checkpoint_fn(t, {}, lambda fn, w=m: w)
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=int(cfg.stack.loss_chunks))
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    model.chunked_output = wrap_head(t, model.chunked_output)
    model.train()
    t.copies[Role.POLICY] = Copy(Role.POLICY, cfg.recipe.copies[0], model, trains=True)
    t.optimizer = make_optimizer(t.trainable_parameters(), cfg, t.regime, t.device, t.fake, t.notes)
    # the recipe's label-shift column, allocated once at setup (self.ignore_labels_cache)
    ignore = torch.full((cfg.batch, 1), loss_fn.ignore_index, device=dev)
    t.extras.update(loss_fn=loss_fn, ignore_labels=ignore, builder=f"torchtune.models {name}")
    t.run = _torchtune_step
    t.notes.append(f"torchtune {RUNTIME.package_version()}: {name}, CEWithChunkedOutputLoss("
                   f"{loss_fn.num_output_chunks} chunks), {type(t.optimizer).__name__}"
                   + (", activation checkpointing per TransformerSelfAttentionLayer" if cfg.grad_ckpt else ""))


def _scale_grads(model, scaler) -> None:
    """``torchtune.training.scale_grads``: every gradient multiplied in place."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad *= scaler


def _build_rope_caches(model, notes: list[str]) -> None:
    """Build the RoPE caches that torchtune's scaled RoPE skips on ``meta``.

    ``Llama3ScaledRoPE.rope_init`` returns early on ``meta`` ("we can't apply scaling until
    freqs is filled with real data"); on the training device the cache exists from
    construction. Its own ``build_rope_cache`` is called here on a ``theta`` of the right
    shape: the cache's bytes are the real ones, its values are not needed on ``meta``.
    """
    built = 0
    for m in model.modules():
        if getattr(m, "is_cache_built", True) or not hasattr(m, "build_rope_cache"):
            continue
        m.register_buffer("theta", torch.empty(m.dim // 2, dtype=torch.float32, device="meta"), persistent=False)
        m.build_rope_cache(m.max_seq_len)
        m.is_cache_built = True
        built += 1
    if built:
        notes.append(f"torchtune scaled RoPE: {built} cache(s) built on meta with the real shape (rope_init skips meta)")


def _torchtune_step(t) -> dict:
    cfg, model = t.cfg, t.policy
    loss_fn, ignore = t.extras["loss_fn"], t.extras["ignore_labels"]
    num_tokens = 0
    last = None
    for _ in range(cfg.grad_accum):
        t.hooks.phase(Phase.FORWARD)
        tokens = token_ids(t, cfg.batch, cfg.seq)
        labels = tokens.clone()  # padded_collate_sft: full-length examples, every token a label
        current_num_tokens = (labels != loss_fn.ignore_index).sum()
        num_tokens = num_tokens + current_num_tokens
        labels = torch.hstack((labels[..., 1:], ignore[: labels.shape[0]]))
        logits = model(tokens)
        loss = loss_fn(logits, labels)
        del logits  # "free logits otherwise it peaks backward memory"
        t.logits_done()
        current_loss = loss * current_num_tokens
        del loss, tokens, labels
        t.hooks.phase(Phase.BACKWARD)
        t.backward(current_loss)
        last = current_loss.detach()
        del current_loss
        t.hooks.event("after_backward", t)
    t.hooks.phase(Phase.OPTIMIZER_STEP)
    _scale_grads(model, 1 / num_tokens)
    t.optimizer.step()
    t.hooks.event("after_optimizer_step", t)
    t.optimizer.zero_grad(set_to_none=True)
    t.hooks.event("step_end", t)
    return {"loss": last}


RUNTIME = TorchtuneRuntime()
