"""Other training stacks' own code, built and stepped like the HF stack (``--framework``).

``build(spec, cfg, ...)`` calls :func:`build_stack` when ``cfg.framework`` is not ``hf``: the
stack's own model, adapters, loss and training step, from the package itself, on any device
(``meta`` for the dry run, ``cuda`` for calibration). Each stack follows its single-device
recipe:

* **torchtune** (``recipes/lora_finetune_single_device.py`` and
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
* **litgpt** (``litgpt/finetune/lora.py`` and ``full.py``, litgpt 0.5): ``GPT(config)`` (the
  LoRA ``GPT`` with ``lora_query``/``lora_key``/``lora_value``/``lora_projection``/
  ``lora_mlp``) initialised in the precision's dtype as ``fabric.init_module`` does
  (``bf16-true``: everything bf16; ``bf16-mixed``: fp32 under autocast, outputs converted to
  fp32 as Fabric's ``convert_output``), ``mark_only_lora_as_trainable``,
  ``model.max_seq_length = seq``; LoRA: ``logits = model(ids, lm_head_chunk_size=128)``,
  ``logits[-1] = logits[-1][..., :-1, :]``, ``chunked_cross_entropy(logits, targets[..., 1:])``;
  full: ``chunked_cross_entropy(model(ids)[..., :-1, :], targets[..., 1:])``; the logits stay
  alive through backward (they are not deleted); ``torch.optim.AdamW`` (foreach on CUDA), no
  clipping (``max_norm: None``), ``zero_grad()``.

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

import contextlib
import importlib
import importlib.util
import logging
import warnings

import torch

from ..errors import MissingDependencyError, VramplanError
from ..methods import Adapter, Role
from ..taxonomy import Phase

#: stack -> (module, the pip hint's extra, what the package needs beyond itself)
PACKAGES = {
    "torchtune": ("torchtune", "torchtune", "torchtune 0.6 imports torchao.dtypes.nf4tensor (torchao < 0.18) and PEFT "
                  "rejects torchao < 0.16: torchao >= 0.16, < 0.18"),
    "litgpt": ("litgpt", "litgpt", None),
}
#: the methods each stack's single-device recipes train
METHODS = {"torchtune": (Adapter.FULL, Adapter.LORA, Adapter.QLORA, Adapter.DORA),
           "litgpt": (Adapter.FULL, Adapter.LORA)}
#: HF module names -> torchtune's
_TT_ATTN = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "output_proj"}
_MLP = ("gate_proj", "up_proj", "down_proj")
_LIT_ATTN = {"q_proj": "lora_query", "k_proj": "lora_key", "v_proj": "lora_value", "o_proj": "lora_projection"}
_LOGGERS = ("torchao", "torchtune", "lightning", "lightning.fabric", "lightning_fabric", "litgpt",
            "torch.utils._pytree")


@contextlib.contextmanager
def _quiet():
    """The stacks log at import (torchao's skipped C++ extensions) and warn on meta: keep stderr to one line."""
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def require_stack(framework: str):
    """Import the stack's package, or raise :class:`MissingDependencyError` with the pip hint.

    Raises:
        MissingDependencyError: the package is not installed, or is installed but does not
            import (torchtune 0.6.1 with a torchao it does not know).
    """
    module, extra, needs = PACKAGES[framework]
    from ..errors import install_hint

    hint = install_hint(extra)
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"the {framework} dry run needs the {module} package, which is not installed", hint)
    try:
        with _quiet():
            mod = importlib.import_module(module)
            if framework == "torchtune":
                for sub in ("torchtune.modules", "torchtune.modules.loss", "torchtune.modules.peft"):
                    importlib.import_module(sub)
    except ImportError as exc:
        from .build import first_sentence

        raise MissingDependencyError(f"{module} is installed but does not import ({first_sentence(exc, 120)})",
                                     (needs + "; " if needs else "") + hint) from None
    return mod


def package_version(framework: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGES[framework][0])
    except (KeyError, PackageNotFoundError):
        return None


def _rope_theta(spec) -> float:
    hc = spec.hf_config or {}
    rp = hc.get("rope_parameters") or {}
    return float(hc.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def _rope_scaling(spec) -> dict:
    hc = spec.hf_config or {}
    rs = hc.get("rope_scaling") or hc.get("rope_parameters") or {}
    return rs if isinstance(rs, dict) else {}


def _norm_eps(spec) -> float:
    hc = spec.hf_config or {}
    return float(hc.get("rms_norm_eps") or hc.get("layer_norm_eps") or 1e-5)


def _split_targets(cfg, names: dict, stack: str) -> tuple[list[str], bool]:
    """HF target names -> (the stack's attention module names, adapt the whole MLP)."""
    targets = set(cfg.targets)
    mlp = targets & set(_MLP)
    if mlp and mlp != set(_MLP):
        raise VramplanError(f"{stack} adapts the MLP as a whole (gate, up and down projections) or not at all, "
                            f"not {', '.join(sorted(mlp))} alone", "add the other MLP projections or drop them")
    other = targets - set(_MLP) - set(names)
    if other:
        raise VramplanError(f"{stack} cannot put an adapter on {sorted(other)[0]}",
                            f"its LoRA targets are {', '.join(list(names) + list(_MLP))}")
    return [names[t] for t in names if t in targets], bool(mlp)


def check_stack(spec, cfg) -> None:
    """Reject what the stack's recipes do not train, before anything is built.

    Raises:
        VramplanError: a method, model family, precision or technique the stack does not run.
        MissingDependencyError: the stack's package is missing.
    """
    fw = cfg.framework
    hint = f"`vramplan estimate --framework {fw}` gives its documented accounting"
    if fw not in PACKAGES:
        raise VramplanError(f"the dry run cannot run the {fw} stack here", hint)
    recipe = cfg.recipe
    if recipe.method.name not in ("full", "lora", "qlora", "dora") or recipe.adapter not in METHODS[fw]:
        runs = ", ".join(a.value for a in METHODS[fw])
        raise VramplanError(f"the {fw} dry run traces its single-device fine-tuning recipes ({runs}), not {recipe.name}",
                            hint)
    if fw == "torchtune" and spec.head_dim * spec.num_heads != spec.hidden_size:
        raise VramplanError(f"torchtune's builders derive head_dim = hidden / heads = "
                            f"{spec.hidden_size // spec.num_heads}, but {spec.name} has head_dim {spec.head_dim}", hint)
    if fw == "torchtune":
        if spec.model_type not in ("llama", "mistral", "qwen2"):
            raise VramplanError(f"the torchtune dry run builds llama, mistral and qwen2 models, not {spec.model_type}",
                                hint)
        if cfg.precision not in ("bf16", "fp32"):
            raise VramplanError(f"torchtune recipes train in one dtype (dtype: bf16 or fp32), not {cfg.precision}",
                                "use --precision bf16")
        if recipe.adapter.is_peft:
            _split_targets(cfg, _TT_ATTN, fw)
    if fw == "litgpt":
        if spec.model_type not in ("llama", "mistral", "qwen2"):
            raise VramplanError(f"the litgpt dry run builds llama, mistral and qwen2 models, not {spec.model_type}",
                                hint)
        if cfg.precision not in ("bf16", "bf16-mixed", "fp32"):
            raise VramplanError(f"the litgpt dry run runs bf16-true, bf16-mixed and 32-true, not {cfg.precision}",
                                "use --precision bf16")
        if cfg.grad_ckpt:
            raise VramplanError("litgpt's finetune scripts have no gradient checkpointing", "use --no-grad-ckpt")
        if recipe.adapter.is_peft:
            _split_targets(cfg, _LIT_ATTN, fw)
    if cfg.attn == "eager":
        raise VramplanError(f"{fw} always runs SDPA attention", "use --attn sdpa or flash")
    require_stack(fw)


def build_stack(t) -> None:
    """Build ``t``'s copies, optimiser and step for ``t.cfg.framework`` (see the module docstring)."""
    with _quiet():
        if t.cfg.framework == "torchtune":
            _build_torchtune(t)
        else:
            _build_litgpt(t)


def _wrap_head(t, fn):
    """Open the logits section around the output projection ``fn(hidden) -> logits`` (attribution only)."""

    def wrapped(h, *a, **k):
        t._head_pre_hook(None, (h,))
        out = fn(h, *a, **k)
        t._head_post_hook(None, (h,), out)
        return out

    return wrapped


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


# -- torchtune ---------------------------------------------------------------------------------------
def _torchtune_builder(spec, cfg):
    """The component builder of ``spec``'s family and its arguments (from the HF config)."""
    from ..stacks import torchtune_builder

    family = torchtune_builder(spec, peft=False)  # llama3 / llama3_1 / llama3_2, mistral, qwen2
    kw = dict(vocab_size=int(spec.vocab_size), num_layers=int(spec.num_layers), num_heads=int(spec.num_heads),
              num_kv_heads=int(spec.num_kv_heads), embed_dim=int(spec.hidden_size),
              intermediate_dim=int(spec.intermediate_size), max_seq_len=int(spec.max_position_embeddings),
              norm_eps=_norm_eps(spec), rope_base=_rope_theta(spec))
    if family.startswith("llama3"):
        rs = _rope_scaling(spec)
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
    attn, mlp = _split_targets(cfg, _TT_ATTN, "torchtune")
    kw.update(lora_attn_modules=attn, apply_lora_to_mlp=mlp, lora_rank=int(cfg.rank), lora_alpha=float(cfg.alpha),
              lora_dropout=float(cfg.dropout), use_dora=adapter is Adapter.DORA,
              quantize_base=adapter is Adapter.QLORA)
    return getattr(mod, "lora_" + family), kw, "lora_" + family


def _build_torchtune(t) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from torchtune import modules
    from torchtune.modules.loss import CEWithChunkedOutputLoss
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from .build import Copy, checkpoint_fn, make_optimizer, torch_dtype

    cfg, spec = t.cfg, t.spec
    dtype = torch_dtype(t.regime.frozen_dtype)  # the recipe's one `dtype` (bf16 or fp32)
    builder, kwargs, name = _torchtune_builder(spec, cfg)
    dev = t.tensor_device
    try:
        with _default_dtype(dtype), torch.device(dev):
            model = builder(**kwargs)
    except (AssertionError, ValueError, RuntimeError) as exc:
        from .build import first_sentence

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
    model.chunked_output = _wrap_head(t, model.chunked_output)
    model.train()
    t.copies[Role.POLICY] = Copy(Role.POLICY, cfg.recipe.copies[0], model, trains=True)
    t.optimizer = make_optimizer(t.trainable_parameters(), cfg, t.regime, t.device, t.fake, t.notes)
    # the recipe's label-shift column, allocated once at setup (self.ignore_labels_cache)
    ignore = torch.full((cfg.batch, 1), loss_fn.ignore_index, device=dev)
    t.extras.update(loss_fn=loss_fn, ignore_labels=ignore, builder=f"torchtune.models {name}")
    t.run = _torchtune_step
    t.notes.append(f"torchtune {package_version('torchtune')}: {name}, CEWithChunkedOutputLoss("
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
    from .steps import _ids

    cfg, model = t.cfg, t.policy
    loss_fn, ignore = t.extras["loss_fn"], t.extras["ignore_labels"]
    num_tokens = 0
    last = None
    for _ in range(cfg.grad_accum):
        t.hooks.phase(Phase.FORWARD)
        tokens = _ids(t, cfg.batch, cfg.seq)
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


# -- litgpt ------------------------------------------------------------------------------------------
def _litgpt_config(spec, cfg):
    """litgpt's ``Config`` for ``spec``: its own catalogue entry when it has the HF id, else mapped."""
    from litgpt.config import Config as BaseConfig
    from litgpt.lora import Config as LoRAConfig

    lora = cfg.recipe.adapter.is_peft
    cls = LoRAConfig if lora else BaseConfig
    extra = {}
    if lora:
        attn, mlp = _split_targets(cfg, _LIT_ATTN, "litgpt")
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
    rs = _rope_scaling(spec)
    adjustments = None
    if rs.get("rope_type", rs.get("type")) == "llama3":
        adjustments = dict(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                           high_freq_factor=float(rs["high_freq_factor"]),
                           original_max_seq_len=int(rs["original_max_position_embeddings"]))
    conf = cls(name=spec.name, block_size=int(spec.max_position_embeddings), vocab_size=int(spec.vocab_size),
               padded_vocab_size=int(spec.vocab_size), n_layer=int(spec.num_layers), n_head=int(spec.num_heads),
               n_embd=int(spec.hidden_size), head_size=int(spec.head_dim), n_query_groups=int(spec.num_kv_heads),
               rotary_percentage=1.0, parallel_residual=False, bias=False, attn_bias=bool(spec.qkv_bias),
               norm_class_name="RMSNorm", norm_eps=_norm_eps(spec), mlp_class_name="LLaMAMLP",
               intermediate_size=int(spec.intermediate_size), rope_base=int(_rope_theta(spec)),
               rope_adjustments=adjustments, **extra)
    return conf, "litgpt Config mapped from the HF config"


def _build_litgpt(t) -> None:
    from .build import Copy, make_optimizer, torch_dtype

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
    with _default_dtype(dtype), torch.device(dev):
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
    prec = {"bf16": "bf16-true", "bf16-mixed": "bf16-mixed", "fp32": "32-true"}[t.regime.name]
    t.notes.append(f"litgpt {package_version('litgpt')}: {origin}, precision {prec}, "
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

    from .steps import _ids

    cfg, model = t.cfg, t.policy
    lora = cfg.recipe.adapter.is_peft
    last = None
    for _ in range(cfg.grad_accum):
        t.hooks.phase(Phase.FORWARD)
        input_ids = _ids(t, cfg.batch, cfg.seq)
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
