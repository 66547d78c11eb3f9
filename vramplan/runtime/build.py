"""Build the models, adapters and optimiser of one training configuration, on any device.

Everything is built from the method registry (``cfg.recipe``: which copies exist and
which train) and the precision regime (``vramplan.precision``: the dtype of every kind of
tensor), the way the Hugging Face stack builds it:

* ``AutoModelForCausalLM.from_config`` (``AutoModelForSequenceClassification`` with
  ``num_labels=1`` for reward and value copies) in the regime's dtype: trainable full
  copies in ``trainable_dtype``, frozen bases in ``frozen_dtype`` (the load dtype).
* PEFT exactly as a user calls it: ``LoraConfig(r, lora_alpha, lora_dropout,
  target_modules, use_dora)`` or ``IA3Config(target_modules, feedforward_modules)`` and
  ``get_peft_model`` (PEFT keeps its adapters fp32 over a 16-bit base,
  ``autocast_adapter_dtype=True``).
* QLoRA: NF4 ``Linear4bit`` layers (``vramplan.runtime.nf4``) and PEFT's own
  ``prepare_model_for_kbit_training`` (TRL's SFTTrainer calls it): every non-quantised
  fp16/bf16 parameter -- embeddings, norms, lm_head, fused MoE experts -- is upcast to fp32.
* Gradient checkpointing as HF Trainer enables it: ``gradient_checkpointing_enable(
  gradient_checkpointing_kwargs={"use_reentrant": False})``.
* The optimiser per ``cfg.optimizer``: torch AdamW ``foreach`` for the plain loop (CUDA's
  default) and ``fused`` for the HF Trainer (``adamw_torch_fused``), bitsandbytes
  ``AdamW8bit`` / ``PagedAdamW8bit``, torch ``SGD`` (no momentum), transformers
  ``Adafactor(scale_parameter=False, relative_step=False)``. One optimiser holds every
  trainable copy (TRL's PPO trains policy and value with one optimiser).

``fake=True`` builds on ``meta`` while emulating ``device`` (CUDA): no weights exist, and
the trainee's steps run under :class:`~vramplan.runtime.emulation.CudaEmulation`.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..attention import attention_kernel, default_kernel, scores_kernel
from ..config import TrainConfig
from ..errors import VramplanError
from ..methods import Adapter, ModelCopy, Recipe, Role
from ..models import ModelSpec
from ..optimizers import get_optimizer
from ..precision import Regime
from ..stacks import release
from ..taxonomy import Component, Phase
from .emulation import CudaEmulation, emulated_autocast, install_meta_patches
from .hooks import NULL_HOOKS, StepHooks

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: config.json keys that are not model hyper-parameters (or would trigger loading behaviour)
_DROP_KEYS = ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "quantization_config",
              "auto_map", "_attn_implementation", "attn_implementation")
LR = 1e-5


def first_sentence(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's message, on one line (for VramplanError)."""
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    cut = text.find(". ")
    text = text[: cut + 1] if 0 < cut < limit else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def hf_config(spec: ModelSpec, *, num_labels: int | None = None):
    """``AutoConfig.for_model(**spec.hf_config)``: the real transformers config of ``spec``."""
    from transformers import AutoConfig

    raw = {k: v for k, v in (spec.hf_config or {}).items() if k not in _DROP_KEYS}
    if "text_config" in raw and "hidden_size" not in raw:  # multimodal wrapper: the language model
        raw = dict(raw["text_config"])
    raw.setdefault("model_type", spec.model_type)
    try:
        conf = AutoConfig.for_model(**raw)
    except (ValueError, KeyError) as exc:
        raise VramplanError(f"transformers cannot build a config for {spec.name} ({exc})",
                            "is its model_type supported by the installed transformers?") from None
    if num_labels is not None:
        conf.num_labels = num_labels
        if getattr(conf, "pad_token_id", None) is None:
            conf.pad_token_id = getattr(conf, "eos_token_id", None) if isinstance(getattr(conf, "eos_token_id", None),
                                                                                   int) else 0
    return conf


@dataclass
class Copy:
    """One model copy held in memory, as built."""

    role: Role
    spec: ModelCopy
    module: nn.Module  # the PeftModel or the PreTrainedModel
    trains: bool

    @property
    def inner(self) -> nn.Module:
        """The transformers model (under the PEFT wrapper, if any)."""
        m = self.module
        return m.get_base_model() if hasattr(m, "get_base_model") else m


@dataclass
class Trainee:
    """What one training configuration holds in memory, plus the step that trains it.

    Use :func:`build`; then call :meth:`step` (one optimiser step of ``cfg.grad_accum``
    micro-batches). ``device`` is the device the step runs on (or, with ``fake``, the
    device it emulates on ``meta``).
    """

    spec: ModelSpec
    cfg: TrainConfig
    recipe: Recipe
    regime: Regime
    device: str
    fake: bool
    copies: dict[Role, Copy]
    optimizer: Any
    hooks: StepHooks = field(default=NULL_HOOKS, repr=False)
    emulation: CudaEmulation | None = field(default=None, repr=False)
    scaler: Any = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)
    #: the step of a stack with its own loop (``vramplan.runtime.stacks``); None runs ``steps.run_step``
    run: Any = field(default=None, repr=False)
    #: what that stack's step needs (its loss module, the recipe's label cache)
    extras: dict = field(default_factory=dict, repr=False)
    _logits_depth: int = field(default=0, repr=False)
    _head_grads_pending: int = field(default=0, repr=False)
    _in_backward_logits: bool = field(default=False, repr=False)

    # -- introspection ---------------------------------------------------------------------
    @property
    def tensor_device(self) -> str:
        return "meta" if self.fake else self.device

    @property
    def policy(self) -> nn.Module:
        return self.copies[Role.POLICY].module

    def _distinct_parameters(self, training: bool = False):
        """Each parameter of the copies held once (a copy may share another's: the policy's base under PEFT),
        in the copies' order; ``training``: of the copies that train only."""
        seen = set()
        for c in self.copies.values():
            if training and not c.trains:
                continue
            for p in c.module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self._distinct_parameters(training=True) if p.requires_grad]

    def parameter_components(self):
        """Yield ``(tensor, Component)`` for every parameter, buffer and quantisation constant held."""
        from .nf4 import quant_state_tensors

        for c in self.copies.values():
            peft = c.trains and self.recipe.adapter.is_peft
            for p in c.module.parameters():
                qs = getattr(p, "quant_state", None)
                if qs is not None:
                    yield p, Component.WEIGHTS
                    for t in quant_state_tensors(qs):
                        yield t, Component.QUANT_STATE
                elif is_traceable_wrapper_subclass(p):  # torchao NF4Tensor: codes, then its constants
                    inner = _inner_tensors(p)
                    big = max(inner, key=lambda t: t.untyped_storage().nbytes(), default=None)
                    for t in inner:
                        yield t, (Component.WEIGHTS if t is big else Component.QUANT_STATE)
                elif peft and p.requires_grad:
                    yield p, Component.ADAPTERS
                else:
                    yield p, Component.WEIGHTS
            for b in c.module.buffers():
                yield b, Component.WEIGHTS

    def counts(self) -> tuple[int, int]:
        """``(params, trainable_params)`` over the copies held (an NF4 weight counts its real elements)."""
        total = 0
        for p in self._distinct_parameters():
            qs = getattr(p, "quant_state", None)
            total += int(qs.shape.numel()) if qs is not None else p.numel()
        return total, sum(p.numel() for p in self.trainable_parameters())

    # -- precision -----------------------------------------------------------------------------
    def amp(self, enabled: bool = True):
        """The regime's autocast context (the emulated CUDA one on ``meta``); a no-op without autocast."""
        import contextlib

        if not enabled or self.regime.autocast is None:
            return contextlib.nullcontext()
        dtype = torch_dtype(self.regime.autocast)
        if self.fake:
            return emulated_autocast(self.emulation, dtype)
        return torch.autocast(self.device.split(":")[0], dtype=dtype)

    def amp_state(self):
        if self.fake:
            return torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
        return None

    def amp_restore(self, state):
        import contextlib

        if not self.fake or state is None or not state[0]:
            return contextlib.nullcontext()
        return emulated_autocast(self.emulation, state[1])

    # -- logits sections (attribution only) -----------------------------------------------
    def _head_pre_hook(self, module, args):
        if self._logits_depth == 0:
            self.hooks.enter(Component.LOGITS)
        self._logits_depth += 1

    def _head_post_hook(self, module, args, output):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
            self._head_grads_pending += 1
            x.register_hook(self._head_grad_done)

    def _head_grad_done(self, grad):
        self._head_grads_pending -= 1
        if self._head_grads_pending <= 0 and self._in_backward_logits:
            self._in_backward_logits = False
            self.hooks.exit(Component.LOGITS)

    def logits_done(self) -> None:
        """Close the forward logits section opened by the output head (called once the loss exists)."""
        if self._logits_depth:
            self._logits_depth = 0
            self.hooks.exit(Component.LOGITS)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` with the logits section open until the heads' input gradients exist."""
        self.logits_done()
        if self._head_grads_pending > 0:
            self._in_backward_logits = True
            self.hooks.enter(Component.LOGITS)
        try:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            elif self.regime.grad_scaler and self.fake:  # GradScaler: loss * scale (a 0-dim fp32)
                (loss * torch.full((), 65536.0, device=loss.device)).backward()
            else:
                loss.backward()
        finally:
            if self._in_backward_logits:
                self._in_backward_logits = False
                self.hooks.exit(Component.LOGITS)
            self._head_grads_pending = 0

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> dict:
        """One optimiser step: ``cfg.grad_accum`` micro-batches of the method's step, then the update."""
        from . import steps

        ctx = self.emulation if self.fake else _null()
        with ctx:
            return (self.run or steps.run_step)(self)


def _inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a traceable wrapper subclass (``__tensor_flatten__``), recursively."""
    out = []
    for name in t.__tensor_flatten__()[0]:
        x = getattr(t, name)
        out.extend(_inner_tensors(x) if is_traceable_wrapper_subclass(x) else [x])
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------
def attn_impl(cfg: TrainConfig, device: str, fake: bool, notes: list[str], spec: ModelSpec | None = None) -> str:
    kernel = cfg.attention
    if kernel.materialises_scores:
        return kernel.hf_name
    eager = scores_kernel().hf_name
    if spec is not None and spec.eager_only:  # BLOOM: its own attention, no SDPA or flash path in transformers
        notes.append(f"{spec.architecture} runs its own attention (scores materialised): built with eager")
        return eager
    if spec is not None:
        from ..memory import sdpa_refused

        if sdpa_refused(spec, cfg):  # Gemma-2, transformers >= 5.21: `_supports_sdpa = False`, the default is eager
            notes.append(f"transformers refuses SDPA for {spec.architecture} (softcapped attention): built with eager, "
                         "as transformers' default does")
            return eager
    if kernel.module is not None:  # a kernel of its own package (flash-attn), standing in for the one it ties
        stand_in = attention_kernel(kernel.same_as).hf_name if kernel.same_as else default_kernel().hf_name
        if fake:
            return stand_in  # routed to the flash kernels by CudaEmulation
        if device.startswith("cuda") and importlib.util.find_spec(kernel.module) is not None:
            return kernel.hf_name
        notes.append(f"{kernel.package} is not installed: attention runs through SDPA (its flash kernel on CUDA)")
        return stand_in
    return kernel.hf_name


def _from_config(spec: ModelSpec, head: str, dtype: torch.dtype, attn: str, device: str) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    conf = hf_config(spec, num_labels=1 if head == "scalar" else None)
    cls = AutoModelForSequenceClassification if head == "scalar" else AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device(device):
                if attn == "sdpa" and spec.sdpa_unsupported and not getattr(cls._model_mapping[type(conf)],
                                                                            "_supports_sdpa", True):
                    # flash emulated through SDPA (CudaEmulation) on a model transformers builds without SDPA
                    # (Gemma-2 >= 5.21: flash-attn >= 2.6 applies its softcap in-kernel): built eager, then its
                    # attention dispatched to SDPA, the flash kernels' stand-in (the module tree is the same)
                    # (transformers' sdpa_attention_forward refuses a softcap: the stand-in drops it, as the
                    # in-kernel softcap of flash-attn holds no memory of its own)
                    model = cls.from_config(conf, dtype=dtype, attn_implementation="eager")
                    model.config._attn_implementation = "sdpa"
                    for m in model.modules():
                        if getattr(m, "attn_logit_softcapping", None) is not None:
                            m.attn_logit_softcapping = None
                    return model
                return cls.from_config(conf, dtype=dtype, attn_implementation=attn)
        except (ValueError, KeyError, NotImplementedError) as exc:
            what = "sequence classifier" if head == "scalar" else "causal LM"
            hint = "try --attn eager" if "attention implementation" in str(exc) else None
            raise VramplanError(f"transformers cannot build {spec.name} as a {what}: {first_sentence(exc)}",
                                hint) from None


def _enable_gc(model: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # pragma: no cover - transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _wrap_gc(model: nn.Module, trainee: Trainee) -> None:
    """Make checkpoint recomputation restore the emulated autocast state and report itself.

    torch.utils.checkpoint restores autocast for the inputs' device (``meta`` has none),
    so on ``meta`` the recompute would otherwise run without the emulated CUDA autocast.
    """
    for m in model.modules():
        f = getattr(m, "_gradient_checkpointing_func", None)
        if f is not None and getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = checkpoint_fn(
                trainee, getattr(f, "keywords", {}), lambda function: (getattr(function, "args", None) or (None,))[0])


def checkpoint_fn(trainee: Trainee, keywords: dict | None = None, layer_of=lambda function: None):
    """A non-reentrant ``torch.utils.checkpoint`` whose recomputation re-enters the trainee's modes.

    Returns ``ckpt(function, *args, **kw)``. ``keywords`` are the checkpoint keywords the
    stack passes (``use_reentrant=False``); on ``meta`` the RNG state is not preserved (meta
    has none, and it costs no device memory either way). ``layer_of(function)`` names the
    decoder layer being recomputed for :meth:`StepHooks.recompute`.
    """
    from torch.utils.checkpoint import checkpoint

    kwargs = {"use_reentrant": False, **dict(keywords or {})}
    if trainee.fake:
        kwargs["preserve_rng_state"] = False

    def ckpt(function, *args, **kw):
        layer = layer_of(function)
        state = trainee.amp_state()
        calls = [0]

        def run(*a, **k):
            calls[0] += 1
            if calls[0] == 1:
                return function(*a, **k)
            # the autograd engine runs the recompute with torch-function modes off: re-enter ours
            with trainee.hooks.recompute(layer), (trainee.emulation or _null()), trainee.amp_restore(state):
                return function(*a, **k)

        return checkpoint(run, *args, **{**kwargs, **kw})

    ckpt.keywords = kwargs
    return ckpt


def _peft_config(cfg: TrainConfig, spec: ModelSpec, adapter: Adapter, head: str):
    import peft

    task = peft.TaskType.SEQ_CLS if head == "scalar" else peft.TaskType.CAUSAL_LM
    if adapter.ia3:
        ff = [t for t in cfg.targets if t in spec.ia3_feedforward]
        return peft.IA3Config(target_modules=list(cfg.targets), feedforward_modules=ff, task_type=task)
    return peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                           use_dora=adapter.dora, bias="none", task_type=task)


def build_copy(trainee: Trainee, copy: ModelCopy, attn: str) -> Copy:
    spec, cfg, regime = trainee.spec, trainee.cfg, trainee.regime
    dev = trainee.tensor_device
    adapter = copy.adapter
    full = adapter is Adapter.FULL
    dtype = torch_dtype(regime.trainable_dtype if full else regime.frozen_dtype)
    if copy.quantized and not trainee.fake:  # layer by layer, as bitsandbytes' loading path (runtime.nf4)
        from .nf4 import linears_on_meta

        with linears_on_meta():
            model = _from_config(spec, copy.head, dtype, attn, dev)
    else:
        model = _from_config(spec, copy.head, dtype, attn, dev)
    if copy.quantized:
        from .nf4 import quantize_linears

        quantize_linears(model, compute_dtype=torch_dtype(regime.frozen_dtype), double_quant=cfg.double_quant,
                         device=dev, fake=trainee.fake)
    if adapter is None:  # a frozen copy (reference / reward)
        model.requires_grad_(False)
        model.eval()
        return Copy(copy.role, copy, model, trains=False)
    if full:
        model.requires_grad_(True)
        if cfg.grad_ckpt:
            _enable_gc(model)
        module = model
    else:
        import peft

        if copy.quantized:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = peft.prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=cfg.grad_ckpt,
                    gradient_checkpointing_kwargs={"use_reentrant": False})
        elif cfg.grad_ckpt:
            _enable_gc(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = peft.get_peft_model(model, _peft_config(cfg, spec, adapter, copy.head))
    if trainee.fake and cfg.grad_ckpt:
        _wrap_gc(module, trainee)
    module.train()
    return Copy(copy.role, copy, module, trains=True)


def _import_class(path: str):
    """``"module:Class"`` -> the class (optimizers.toml's ``class`` fields)."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def make_optimizer(params: list, cfg: TrainConfig, regime: Regime, device: str, fake: bool, notes: list[str]):
    """The optimiser of ``cfg`` over ``params``, built as ``vramplan/data/optimizers.toml`` says.

    ``class(params, lr=LR, **kwargs, **<runner>_kwargs)``: the runner's kernel (foreach for a plain
    loop, fused for the HF Trainer); ``meta_trainer_class`` on ``meta`` under the Trainer (torch
    rejects ``fused=True`` there); a paged class (``cuda_class``) only on a real CUDA device --
    elsewhere its unpaged twin, with a note that the states are counted as device tensors.
    """
    opt = get_optimizer(cfg.optimizer)
    if not params:
        raise VramplanError("nothing to train: the configuration leaves no trainable parameter")
    if opt.package:
        from ..errors import require

        require(opt.package, "calibrate")
    loop = not regime.training_loop.fused_optimizer
    kwargs = {**opt.kwargs, **(opt.loop_kwargs if loop else opt.trainer_kwargs)}
    path = opt.cls
    if fake and not loop and opt.meta_trainer_class:
        path, kwargs = opt.meta_trainer_class, dict(opt.kwargs)
    if opt.cuda_class:
        if not fake and device.startswith("cuda"):
            path = opt.cuda_class
        else:
            notes.append(f"{opt.name}: its {opt.state_label} states are counted as device tensors; on CUDA they live "
                         "in unified memory outside torch's allocator (visible to nvidia-smi, evictable to host)")
    return _import_class(path)(params, lr=LR, **kwargs)


class FusedAdamWOnMeta(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` on ``meta``: same states (``step`` on the device) and kernel.

    The constructor rejects ``meta`` for ``fused=True``, so the states are initialised here
    exactly as ``Adam._init_group`` does for fused, and the step calls ``_fused_adamw_``.
    """

    def __init__(self, params, lr: float = LR):
        super().__init__(params, lr=lr, foreach=False, fused=False)
        self.defaults["fused"] = True
        for g in self.param_groups:
            g["fused"] = True

    def _init_group(self, group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        for p in group["params"]:
            if p.grad is not None and len(self.state[p]) == 0:
                st = self.state[p]
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return super()._init_group(group, params_with_grad, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                   state_steps)


#: the oldest releases the dry run and the runner were tested with (CI runs the dry-run tests on them;
#: pyproject's extras require them). transformers 5.0-5.2 build tied embeddings untied from a config;
#: peft < 0.18 cannot import with transformers 5 (``HybridCache`` is gone).
MIN_VERSIONS = {"transformers": (5, 3), "peft": (0, 18)}


def check_versions() -> None:
    """Refuse, in one line, a transformers or peft release older than :data:`MIN_VERSIONS`.

    Raises:
        VramplanError: an installed release is older than supported.
    """
    from importlib.metadata import PackageNotFoundError, version

    for pkg, least in MIN_VERSIONS.items():
        try:
            have = version(pkg)
        except PackageNotFoundError:
            continue  # (a missing package is MissingDependencyError's job)
        if release(have) < least:
            want = ".".join(map(str, least))
            raise VramplanError(f"{pkg} {have} is not supported by the dry run and the runner (needs {pkg} >= {want})",
                                f"pip install -U '{pkg}>={want}'")


def build(spec: ModelSpec, cfg: TrainConfig, device: str = "cpu", *, fake: bool = False,
          hooks: StepHooks | None = None) -> Trainee:
    """Build every model copy, adapter and the optimiser of ``cfg`` for ``spec``.

    Args:
        spec: the model (its ``hf_config`` is what transformers builds).
        cfg: a validated :class:`~vramplan.config.TrainConfig` (``make_config``).
        device: ``cuda``, ``cuda:N`` or ``cpu`` -- where the step runs, or with ``fake`` the
            device to emulate.
        fake: build on ``meta`` (no weights, nothing allocated) and emulate ``device``'s
            kernels and autocast; what the dry run uses.
        hooks: attribution callbacks (:class:`~vramplan.runtime.hooks.StepHooks`).

    Raises:
        VramplanError: transformers cannot build the config; nothing trains; another stack
            (``cfg.framework``) cannot run this method, model or precision.
        MissingDependencyError: bitsandbytes is needed (QLoRA, 8-bit optimisers) and missing, or
            the stack's package (torchtune, litgpt) is.
    """
    from .stacks import get_runtime

    hooks = hooks or NULL_HOOKS
    stack = get_runtime(cfg.framework)  # the stack's own code: vramplan/runtime/stacks/<name>.py
    regime = stack.regime(cfg)
    notes: list[str] = []
    stack.check(spec, cfg)  # before anything is built: unsupported methods, models, precisions, missing packages
    check_versions()
    if fake:
        install_meta_patches()
    flash_dtype = getattr(torch, regime.compute_dtype, None) if cfg.attention.casts_fp32_inputs else None
    emu = (CudaEmulation(cfg.attn, on_cached_cast=lambda t: hooks.tag(t, Component.AUTOCAST_CACHE),
                         flash_dtype=flash_dtype) if fake else None)
    trainee = Trainee(spec=spec, cfg=cfg, recipe=cfg.recipe, regime=regime, device=device, fake=fake, copies={},
                      optimizer=None, hooks=hooks, emulation=emu, notes=notes)
    hooks.phase(Phase.LOAD)
    stack.build(trainee)
    hooks.event("built", trainee)
    return trainee
