"""The model catalogue and the architecture description every layer plans from.

A :class:`ModelSpec` is parsed from a Hugging Face ``config.json`` dict -- the catalogue
(``vramplan/data/models.json``) stores exactly those dicts, one entry per model with its
source, so ``--model path/to/config.json`` and ``--model llama-2-7b`` go through the same
parser. Layout details per ``model_type`` come from ``data/architectures.toml``.
"""

from __future__ import annotations

import dataclasses
import math

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ._data import load_data, read_config_file
from .errors import VramplanError, unknown


@dataclass(frozen=True)
class Linear:
    """One linear weight of a decoder layer (or an expert bank), as PEFT sees it.

    ``name`` is the module's last name (``q_proj``); ``count`` the number of such matrices
    per layer (experts for a fused MoE bank); ``is_linear`` is False for fused expert
    parameters, which are ``nn.Parameter`` (not ``nn.Linear``) and so never LoRA targets.
    """

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    count: int = 1
    is_linear: bool = True

    @property
    def params(self) -> int:
        return self.count * (self.in_features * self.out_features + (self.out_features if self.bias else 0))


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only causal LM: the shapes that memory and FLOPs depend on."""

    name: str
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qk_norm: str = "none"
    norms_per_layer: int = 2
    # the layer's output passes a norm before the residual add (Gemma-2/3 post_feedforward_layernorm, OLMo-2's
    # post-norms): that norm's fp32 backward runs first in the layer's backward, before the MLP's
    closing_norm: bool = False
    norm_weight_fp32: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    sliding_pattern: int = 0  # every n-th layer is full attention, the rest sliding (Gemma-2: 2, Gemma-3: 6)
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    norm_kind: str = "rms"  # rms (RMSNorm, a weight) | layer (LayerNorm, a weight and a bias: GPT-NeoX, Falcon, Phi-2)
    parallel_block: bool = False  # attention and MLP read the same layer input, added together (GPT-J style)
    mlp_kind: str = "gated"  # gated (gate/up -> act * up -> down) | plain (up -> act -> down: GPT-NeoX, Falcon, Phi-2)
    lm_head_bias: bool = False  # the output projection carries a bias (Phi-2)
    module_names: tuple[tuple[str, str], ...] = ()  # role -> the module's name where it is not the Llama one
    dense_experts: bool = False  # every expert runs on every token, unselected ones weighted 0 (transformers Llama-4)
    router_name: str = ""  # the router is an nn.Linear subclass of this name (Llama-4), else a bare parameter "gate"
    shared_expert_gate: bool = True  # the shared expert's output is gated by a 1-unit linear (Qwen2-MoE)
    sdpa_math: bool = False  # transformers hands SDPA unequal q and kv head counts: only its math backend runs it
    linear_subclass: str = ""  # the decoder linears are this nn.Linear subclass (Falcon: FalconLinear), not nn.Linear
    embed_norm: bool = False  # a norm between the embedding and the first layer (BLOOM's word_embeddings_layernorm)
    eager_only: bool = False  # the model's own attention materialises its scores whatever attn_implementation says
    sdpa_unsupported: bool = False  # transformers refuses SDPA for it (Gemma-2's softcap, >= 5.21): eager instead
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    ia3_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] = ("down_proj",)
    hf_id: str | None = None
    source: str | None = None
    published_params: int | None = None
    aliases: tuple[str, ...] = ()
    hf_config: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    # -- derived shapes -------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def mod(self, role: str) -> str:
        """The module name of a layer role (``q_proj``, ``qkv_proj``, ``o_proj``, ``gate_proj``, ``up_proj``,
        ``down_proj``) in this architecture: ``o_proj`` is ``dense`` in GPT-NeoX, Falcon and Phi-2."""
        for r, n in self.module_names:
            if r == role:
                return n
        return role

    def layer_linears(self) -> list[Linear]:
        """Linear weights of one decoder layer, named as in transformers."""
        try:
            return list(_layer_linears(self))
        except TypeError:  # unhashable (list-valued fields): build it each time
            return self._build_layer_linears()

    def _build_layer_linears(self) -> list[Linear]:
        h, i = self.hidden_size, self.intermediate_size
        out: list[Linear] = []
        m = self.mod
        if self.fused_qkv:
            out.append(Linear(m("qkv_proj"), h, self.q_dim + 2 * self.kv_dim, self.qkv_bias))
        else:
            out += [Linear(m("q_proj"), h, self.q_dim, self.qkv_bias), Linear(m("k_proj"), h, self.kv_dim, self.qkv_bias),
                    Linear(m("v_proj"), h, self.kv_dim, self.qkv_bias)]
        out.append(Linear(m("o_proj"), self.q_dim, h, self.o_bias))
        if self.is_moe:
            e, mi = self.num_experts, self.moe_intermediate_size or i
            # the router is a bare nn.Parameter in transformers >= 5 (not nn.Linear); Llama-4's is an nn.Linear
            out.append(Linear(self.router_name, h, e, False, 1) if self.router_name
                       else Linear("gate", h, e, False, 1, is_linear=False))
            out.append(Linear("experts.gate_up_proj", h, 2 * mi, False, e, is_linear=False))
            out.append(Linear("experts.down_proj", mi, h, False, e, is_linear=False))
            if self.shared_expert_intermediate_size:
                si = self.shared_expert_intermediate_size
                out += [Linear("gate_proj", h, si), Linear("up_proj", h, si), Linear("down_proj", si, h)]
                if self.shared_expert_gate:
                    out.append(Linear("shared_expert_gate", h, 1))
        elif self.mlp_kind == "plain":
            out += [Linear(m("up_proj"), h, i, self.mlp_bias), Linear(m("down_proj"), i, h, self.mlp_bias)]
        elif self.fused_gate_up:
            out += [Linear("gate_up_proj", h, 2 * i, self.mlp_bias), Linear("down_proj", i, h, self.mlp_bias)]
        else:
            out += [Linear("gate_proj", h, i, self.mlp_bias), Linear("up_proj", h, i, self.mlp_bias),
                    Linear("down_proj", i, h, self.mlp_bias)]
        return out

    @property
    def sliding_fraction(self) -> float:
        """Fraction of layers with sliding-window attention (``layer_types`` when the config
        lists them, else every layer when a window is set)."""
        if not self.sliding_window:
            return 0.0
        types = (self.hf_config or {}).get("layer_types")
        if isinstance(types, list) and types:
            return sum(t == "sliding_attention" for t in types) / len(types)
        if self.sliding_pattern > 1:
            L = self.num_layers
            return sum(bool((i + 1) % self.sliding_pattern) for i in range(L)) / L
        return 1.0

    @property
    def norm_width_params(self) -> int:
        """Parameters per normalised element: 1 (RMSNorm's weight) or 2 (LayerNorm's weight and bias)."""
        return 2 if self.norm_kind == "layer" else 1

    @property
    def final_norm_params(self) -> int:
        """Norm parameters outside the layers: the final norm, and the embedding's norm where there is one."""
        return self.norm_width_params * self.hidden_size * (2 if self.embed_norm else 1)

    def layer_norm_params(self) -> int:
        """Norm parameters of one layer (norms and q/k norms)."""
        n = self.norms_per_layer * self.hidden_size * self.norm_width_params
        if self.qk_norm == "head":
            n += 2 * self.head_dim
        elif self.qk_norm == "full":
            n += self.q_dim + self.kv_dim
        return n

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Untied output projection (0 when tied to the embeddings)."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size + (self.vocab_size if self.lm_head_bias else 0)

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: its linears and its norms."""
        try:
            return _counts(self)[0]
        except TypeError:  # unhashable (list-valued fields): count it each time
            return self._layer_params()

    def _layer_params(self) -> int:
        return sum(l.params for l in self.layer_linears()) + self.layer_norm_params()

    @property
    def linear_params(self) -> int:
        """Parameters of all decoder-layer matrices (what NF4 quantises)."""
        try:
            return _counts(self)[2]
        except TypeError:  # unhashable (list-valued fields): count it each time
            return self._linear_params()

    def _linear_params(self) -> int:
        return self.num_layers * sum(l.params for l in self.layer_linears())

    @property
    def params(self) -> int:
        """Total parameters, as ``sum(p.numel() for p in model.parameters())`` counts them."""
        try:
            return _counts(self)[1]
        except TypeError:  # unhashable (list-valued fields): count it each time
            return self._params()

    def _params(self) -> int:
        return (self.embedding_params + self.lm_head_params + self.num_layers * self._layer_params()
                + self.final_norm_params)

    @property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: only the routed experts)."""
        if not self.is_moe:
            return self.params
        mi = self.moe_intermediate_size or self.intermediate_size
        idle = (self.num_experts - self.experts_per_token) * 3 * self.hidden_size * mi
        return self.params - self.num_layers * idle

    def with_layers(self, n: int) -> "ModelSpec":
        """The same architecture with ``n`` decoder layers (per-layer lists of the config cut to
        match): what tests and the dry-run sweep use to keep real widths at a small depth."""
        if n < 1:
            raise VramplanError(f"a model needs at least one layer, not {n}")
        raw = dict(self.hf_config or {})
        if raw:
            raw["num_hidden_layers"] = n
            for key, value in list(raw.items()):
                if isinstance(value, list) and len(value) == self.num_layers and key.endswith("layer_types"):
                    raw[key] = value[:n]
        return dataclasses.replace(self, num_layers=n, name=f"{self.name}[{n}l]", hf_config=raw)

    def describe(self) -> str:
        moe = f", MoE {self.num_experts}x top-{self.experts_per_token}" if self.is_moe else ""
        return (f"{self.name} ({self.params / 1e9:.2f}B params, {self.num_layers} layers, hidden {self.hidden_size}, "
                f"{self.num_heads}/{self.num_kv_heads} heads, vocab {self.vocab_size}{moe})")


_FIELD_HASH = ModelSpec.__hash__  # the frozen dataclass's hash of the fields


def _kept_hash(self: ModelSpec) -> int:
    """The dataclass's hash of the fields, worked out once per (frozen) spec and kept in its ``__dict__``: the
    planner keys its caches on the spec thousands of times per ``fit``. A spec with list fields (from a log's
    JSON) raises TypeError each time, as the dataclass's hash does."""
    try:
        return self.__dict__["_hash"]
    except KeyError:
        h = _FIELD_HASH(self)
        object.__setattr__(self, "_hash", h)
        return h


def _state_without_hash(self: ModelSpec) -> dict:
    """Pickled (and copied) without the kept hash: a string's hash differs from process to process."""
    state = dict(self.__dict__)
    state.pop("_hash", None)
    return state


ModelSpec.__hash__ = _kept_hash
ModelSpec.__getstate__ = _state_without_hash


@lru_cache(maxsize=1024)
def _layer_linears(spec: ModelSpec) -> tuple[Linear, ...]:
    return tuple(spec._build_layer_linears())


@lru_cache(maxsize=1024)
def _counts(spec: ModelSpec) -> tuple[int, int, int]:
    """``(layer_params, params, linear_params)`` of a (hashable) spec, counted once: the planner asks thousands of
    times per ``fit``. None reads ``hf_config`` (outside the hash), so equal specs share the counts."""
    return spec._layer_params(), spec._params(), spec._linear_params()


def _layout(model_type: str) -> dict:
    return load_data("architectures.toml").get(model_type, {})


def layout_of(model_type: str) -> dict:
    """The architecture's entry of ``vramplan/data/architectures.toml`` (``{}`` for an unknown type)."""
    return _layout(model_type)


def supported_model_types() -> list[str]:
    return list(load_data("architectures.toml"))


def _check_supported(cfg: dict, model_type: str, label: str) -> None:
    """Refuse, in one line that says why, a config the Llama-style layout cannot describe.

    An unknown ``model_type`` is planned with the Llama layout when it names its shapes the
    Llama way (``hidden_size``, ``intermediate_size``, ...). A GPT-2-style config (``n_embd``,
    ``n_layer``, fused ``c_attn`` Conv1D, learned positions, a plain 4x MLP) or an encoder /
    encoder-decoder (``*ForMaskedLM``, ``*ForConditionalGeneration`` without a ``text_config``)
    is another architecture, and saying "is it decoder-only?" of GPT-2 would be wrong.
    """
    if _layout(model_type) or model_type in supported_model_types():
        return
    raw = cfg.get("architectures") or []
    archs = [str(a) for a in raw] if isinstance(raw, list) else [str(raw)]  # from_hf_config refuses a non-list
    arch = archs[0] if archs else model_type
    supported = ", ".join(supported_model_types())
    if "n_embd" in cfg or "n_layer" in cfg:
        raise VramplanError(f"config of {label}: model_type {model_type!r} ({arch}) uses the GPT-2 layout (fused "
                            "c_attn, learned position embeddings, ungated MLP), which vramplan does not model",
                            f"vramplan models these layouts: {supported}, and llama-style decoders of other types")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise VramplanError(f"config of {label}: {arch} ({model_type}) is not a decoder-only causal LM",
                            f"vramplan plans *ForCausalLM decoders: {supported}, and llama-style decoders of other types")


class _Fields:
    """Typed reads of one config.json dict; every refusal names the model (``label``) and the key."""

    def __init__(self, cfg: dict, label: str):
        self.cfg, self.label = cfg, label

    def need(self, *keys: str) -> int:
        for k in keys:
            v = self.cfg.get(k)
            if v is not None:
                return _count(v, k, self.label)
        raise VramplanError(f"config of {self.label} has no {keys[0]}", "is it a decoder-only *ForCausalLM config.json?")

    def opt(self, key: str, default: int | None = 0, *, zero_ok: bool = True) -> int | None:
        v = self.cfg.get(key)
        if v is None or v is False or (v == 0 and zero_ok and not isinstance(v, bool)):
            return default
        return _count(v, key, self.label)

    def flag(self, key: str, default) -> bool:
        v = self.cfg.get(key, default)
        if v is None:
            return bool(default)
        if not isinstance(v, (bool, int)) or isinstance(v, int) and not isinstance(v, bool) and v not in (0, 1):
            raise VramplanError(f"config of {self.label}: {key} must be true or false, got {_short(v)}")
        return bool(v)

    def flag_or(self, key: str | None, default) -> bool:
        """``flag(key, default)`` when the layout names a config key, else the layout's default."""
        return self.flag(key, default) if key else bool(default)

    def real_or_none(self, key: str) -> float | None:
        v = self.cfg.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise VramplanError(f"config of {self.label}: {key} must be a positive number, got {_short(v)}")
        return float(v)

    def name(self, *keys: str, default: str) -> str:
        """The first of ``keys`` the config sets (a name), else ``default``."""
        v = next((self.cfg.get(k) for k in keys if self.cfg.get(k)), None) or default
        if not isinstance(v, str):
            raise VramplanError(f"config of {self.label}: {keys[0]} must be a name, got {_short(v)}")
        return v


def _unwrap(cfg: dict, name: str | None) -> dict:
    """The language model's config: a multimodal wrapper's ``text_config`` (with the wrapper's architectures)."""
    if not isinstance(cfg, dict):
        raise VramplanError(f"config of {name or 'the model'} must be a JSON object, got {type(cfg).__name__}")
    if "text_config" in cfg and "hidden_size" not in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise VramplanError(f"config of {name or 'the model'}: text_config must be an object, "
                                f"got {type(cfg['text_config']).__name__}")
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures")}
    return cfg


def _type_and_label(cfg: dict, name: str | None) -> tuple[str, str]:
    """``model_type`` (default llama) and the name errors and the spec carry (at most 200 characters)."""
    model_type = cfg.get("model_type", "llama")
    if not isinstance(model_type, str) or not model_type.strip() or len(model_type) > 100:
        raise VramplanError(f"config of {name or 'the model'}: model_type must be a name, got {_short(model_type)}")
    label = name or cfg.get("_name_or_path") or model_type
    if not isinstance(label, str):
        label = model_type
    return model_type, (label if len(label) <= 200 else label[:197] + "...")


def _architecture(f: _Fields, model_type: str) -> str:
    archs = f.cfg.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise VramplanError(f"config of {f.label}: architectures must be a list of class names, got {_short(archs)}")
    return archs[0] if archs else f"{model_type.title()}ForCausalLM"


def _refuse_interleaved_moe(f: _Fields, lay: dict) -> None:
    """A model whose layers alternate dense and MoE MLPs (Llama-4 Maverick: interleave_moe_layer_step 2, dense
    layers of intermediate_size_mlp) has two layer shapes; a ModelSpec has one."""
    step = f.cfg.get(lay["moe_layers_key"], 1) if lay.get("moe_layers_key") else 1
    if step not in (None, 1):
        raise VramplanError(f"config of {f.label}: {lay['moe_layers_key']} {_short(step)}: layers alternate dense and "
                            "MoE MLPs, which vramplan does not model (one layer shape per model)",
                            "Llama-4 Scout (every layer MoE) is in the catalogue; Maverick is not")


def _falcon_heads(f: _Fields, heads: int, norms: int, parallel: bool) -> tuple[int, int, bool]:
    """(kv heads, norms per layer, SDPA math only) by transformers' Falcon rules.

    ``new_decoder_architecture`` -> ``num_kv_heads`` and ``num_ln_in_parallel_attn`` norms (default 2); else
    ``multi_query`` -> one kv head, which FalconAttention hands SDPA without enable_gqa or expanding it: the
    flash and memory-efficient kernels need equal head counts, so the math backend runs it (scores
    materialised, as eager attention). FalconDecoderLayer has a post_attention_layernorm when not
    parallel_attn. ALiBi Falcon is refused.
    """
    if f.flag("alibi", False):
        raise VramplanError(f"config of {f.label}: Falcon with ALiBi positions is not modelled",
                            "vramplan models rotary Falcon (falcon-7b/40b/180b)")
    if f.flag("new_decoder_architecture", False):
        kv, norms, math_only = f.opt("num_kv_heads", heads, zero_ok=False), f.opt("num_ln_in_parallel_attn", 2), False
    else:
        kv = 1 if f.flag("multi_query", True) else heads
        math_only = kv != heads
    return kv, (norms if parallel else 2), math_only


def _heads(f: _Fields, lay: dict, hidden: int, parallel: bool) -> dict:
    """Attention heads, kv heads, head_dim, norms per layer and the SDPA-math flag, checked."""
    heads = f.need("num_attention_heads", "n_head")
    kv, norms, sdpa_math = f.opt("num_key_value_heads", heads, zero_ok=False), int(lay.get("norms_per_layer", 2)), False
    if lay.get("falcon_layout"):
        kv, norms, sdpa_math = _falcon_heads(f, heads, norms, parallel)
    head_dim = f.opt("head_dim", hidden // heads)
    if head_dim < 1:
        raise VramplanError(f"config of {f.label}: hidden_size {hidden} is smaller than num_attention_heads {heads}")
    if kv > heads or heads % kv:
        raise VramplanError(f"config of {f.label}: {heads} attention heads is not a multiple of {kv} kv heads")
    return dict(num_heads=heads, num_kv_heads=kv, head_dim=head_dim, norms_per_layer=norms, sdpa_math=sdpa_math,
                closing_norm=bool(lay.get("closing_norm", norms == 4)))


def _biases(f: _Fields, lay: dict, model_type: str) -> dict:
    """q/k/v, o and MLP biases: the layout's defaults, overridden by its config keys (Qwen2's o_proj has none)."""
    bias_key, mlp_bias_key = lay.get("bias_key", "attention_bias"), lay.get("mlp_bias_key", "mlp_bias")
    o_bias = f.flag_or(bias_key, lay.get("o_bias", False)) and model_type not in ("qwen2", "qwen2_moe")
    return dict(qkv_bias=f.flag_or(bias_key, lay.get("qkv_bias", False)), o_bias=o_bias,
                mlp_bias=f.flag_or(mlp_bias_key, lay.get("mlp_bias", False)))


def _mlp_width(f: _Fields, lay: dict, hidden: int, num_experts: int) -> int:
    if num_experts and not f.cfg.get("intermediate_size"):
        return f.need("moe_intermediate_size")
    if lay.get("ffn_key"):
        return f.opt(lay["ffn_key"]) or 4 * hidden  # Falcon: ffn_hidden_size, else 4 x hidden (FalconConfig)
    return f.need("intermediate_size", "n_inner")


def _moe(f: _Fields, lay: dict) -> dict:
    """Experts, routing and the shared expert (all zero for a dense model)."""
    e = f.opt("num_local_experts") or f.opt("num_experts")
    per_token = f.opt("num_experts_per_tok")
    shared = f.opt(lay.get("shared_expert_key", "shared_expert_intermediate_size")) if lay.get("shared_expert") else 0
    return dict(num_experts=e, experts_per_token=min(per_token, e) if e else per_token,
                moe_intermediate_size=f.opt("moe_intermediate_size") or (f.opt("intermediate_size") if e else 0),
                shared_expert_intermediate_size=shared, shared_expert_gate=bool(lay.get("shared_expert_gate", True)),
                router_name=str(lay.get("router", "")), dense_experts=bool(lay.get("dense_experts", False)))


def _positions(f: _Fields, lay: dict) -> dict:
    """Context, sliding-window attention and logit soft-capping."""
    sliding = f.opt("sliding_window", None) if f.flag("use_sliding_window", True) else None
    types = f.cfg.get("layer_types")
    if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
        raise VramplanError(f"config of {f.label}: layer_types must be a list of names")
    return dict(max_position_embeddings=f.opt("max_position_embeddings", 4096), sliding_window=sliding,
                sliding_pattern=f.opt("sliding_window_pattern") or int(lay.get("sliding_window_pattern", 0)),
                final_logit_softcapping=f.real_or_none("final_logit_softcapping"),
                attn_logit_softcapping=f.real_or_none("attn_logit_softcapping"))


def _layout_fields(lay: dict) -> dict:
    """What ``architectures.toml`` alone decides: fusions, norms, block and MLP kind, names, PEFT defaults."""
    return dict(
        fused_qkv=bool(lay.get("fused_qkv", False)), fused_gate_up=bool(lay.get("fused_gate_up", False)),
        qk_norm=str(lay.get("qk_norm", "none")), norm_kind=str(lay.get("norm", "rms")),
        mlp_kind=str(lay.get("mlp", "gated")), lm_head_bias=bool(lay.get("lm_head_bias", False)),
        linear_subclass=str(lay.get("linear_subclass", "")), embed_norm=bool(lay.get("embed_norm", False)),
        eager_only=bool(lay.get("eager_only", False)), sdpa_unsupported=bool(lay.get("sdpa_unsupported", False)),
        module_names=tuple(sorted((str(k), str(v)) for k, v in (lay.get("names") or {}).items())),
        norm_weight_fp32=bool(lay.get("norm_weight_fp32", False)),
        lora_targets=tuple(lay.get("lora_targets", ("q_proj", "v_proj"))),
        ia3_targets=tuple(lay.get("ia3_targets", ("k_proj", "v_proj", "down_proj"))),
        ia3_feedforward=tuple(lay.get("ia3_feedforward", ("down_proj",))),
    )


def from_hf_config(cfg: dict, name: str | None = None, **meta) -> ModelSpec:
    """Parse a Hugging Face ``config.json`` dict into a :class:`ModelSpec`.

    Any ``*ForCausalLM`` decoder with the usual fields works: an unknown ``model_type``
    gets the Llama layout (separate q/k/v/o and gated MLP), honouring ``attention_bias``
    and ``mlp_bias``. A multimodal wrapper plans its ``text_config``.

    Raises:
        VramplanError: a required field is missing or not a positive integer.
    """
    cfg = _unwrap(cfg, name)
    model_type, label = _type_and_label(cfg, name)
    lay = _layout(model_type)
    _check_supported(cfg, model_type, str(label))
    f = _Fields(cfg, label)
    hidden = f.need("hidden_size", "n_embd", "d_model")
    parallel = f.flag(lay["parallel_key"], bool(lay.get("parallel_block", False))) if lay.get("parallel_key") \
        else bool(lay.get("parallel_block", False))
    _refuse_interleaved_moe(f, lay)
    heads = _heads(f, lay, hidden, parallel)
    moe_experts = f.opt("num_local_experts") or f.opt("num_experts")
    arch, biases = _architecture(f, model_type), _biases(f, lay, model_type)
    act = f.name("hidden_act", "hidden_activation", "activation", default=str(lay.get("act", "silu")))
    width, positions = _mlp_width(f, lay, hidden, moe_experts), _positions(f, lay)
    layers, vocab = f.need("num_hidden_layers", "n_layer"), f.need("vocab_size")
    return ModelSpec(
        name=str(label), model_type=model_type, architecture=str(arch), hidden_size=hidden, num_layers=layers,
        **heads, intermediate_size=width, vocab_size=vocab,
        tie_embeddings=f.flag("tie_word_embeddings", lay.get("tie_default", False)), hidden_act=act, **biases,
        parallel_block=parallel, **_layout_fields(lay), **_moe(f, lay), **positions,
        hf_config=dict(cfg), **meta,
    )


#: Upper bounds on config.json sizes (far above any released model; they keep the arithmetic finite).
_CONFIG_MAX = {"hidden_size": 1 << 20, "num_hidden_layers": 1 << 16, "vocab_size": 1 << 27,
               "intermediate_size": 1 << 24, "max_position_embeddings": 1 << 30}


def _short(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**15:
        text = f"{float(v):.3g}" if abs(v) < 10**300 else f"a {len(str(abs(v)))}-digit number"
    else:
        text = " ".join(repr(v).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _count(v, key: str, label: str) -> int:
    """A positive whole number from config.json (NaN, infinities, strings, lists, floats with a fraction refused)."""
    ok = not isinstance(v, bool) and (isinstance(v, int) or isinstance(v, float) and math.isfinite(v) and v == int(v))
    if not ok or v <= 0:
        raise VramplanError(f"config of {label}: {key} must be a positive integer, got {_short(v)}",
                            "check the config.json")
    limit = _CONFIG_MAX.get(key, 1 << 30)
    if v > limit:
        raise VramplanError(f"config of {label}: {key} {_short(v)} is implausibly large (the limit is {limit:,})",
                            "check the config.json")
    return int(v)


# -- catalogue ------------------------------------------------------------------------

@lru_cache(maxsize=None)
def catalogue() -> dict[str, ModelSpec]:
    """All catalogue models by name, validated on load."""
    return {name: _catalogue_spec(name) for name in _entries()}


@lru_cache(maxsize=None)
def _entries() -> dict[str, dict]:
    """``models.json``'s entries by name, each with the fields a spec needs (``name``, ``config``, ``source``)."""
    out: dict[str, dict] = {}
    for entry in load_data("models.json")["models"]:
        try:
            name, _config, _source = entry["name"], entry["config"], entry["source"]
        except KeyError as exc:
            raise VramplanError(f"models.json: entry {entry.get('name')!r} lacks {exc}") from None
        if name in out:
            raise VramplanError(f"models.json: duplicate model {name!r}")
        out[name] = entry
    return out


@lru_cache(maxsize=None)
def _catalogue_spec(name: str) -> ModelSpec:
    """The catalogue's spec of model ``name`` (an entry of :func:`_entries`), built on first use and kept: resolving
    one model builds its spec alone, and :func:`catalogue` hands out the same objects."""
    entry = _entries()[name]
    spec = from_hf_config(entry["config"], name=name, hf_id=entry.get("hf_id"), source=entry["source"],
                          published_params=entry.get("params"), aliases=tuple(entry.get("aliases", ())))
    if spec.name != name:  # a name the parser would not keep (empty, not a string, over 200 characters)
        raise VramplanError(f"models.json: entry {name!r} is named {spec.name!r} by its spec")
    return spec


@lru_cache(maxsize=None)
def _aliases() -> dict[str, str]:
    """Every name, alias and Hugging Face id of the catalogue (lower case) -> the model's name, read from the
    entries (no spec built)."""
    table: dict[str, str] = {}
    for name, entry in _entries().items():
        hf_id = entry.get("hf_id")
        keys = [name] + list(entry.get("aliases", ())) + ([hf_id] if hf_id else [])
        for key in keys:
            k = key.lower()
            if k in table and table[k] != name:
                raise VramplanError(f"models.json: alias {key!r} names both {table[k]} and {name}")
            table[k] = name
    return table


def size_aliases() -> dict[str, str]:
    """Size shorthands (``7b``, ``13b``) and the model each resolves to."""
    return {k: v for k, v in _aliases().items() if k[:-1].replace(".", "").isdigit() and k[-1] in "bm"}


def get_model(name: str | Path | ModelSpec) -> ModelSpec:
    """Resolve a catalogue name, an alias (``13b``), an HF repo id, or a local config path.

    A path may be a ``config.json`` file or a directory holding one.
    """
    if isinstance(name, ModelSpec):
        return name
    if not isinstance(name, (str, Path)):
        raise VramplanError(f"model must be a name or a config path, got {type(name).__name__}",
                            "e.g. 'llama-2-7b', '7b' or 'path/to/config.json'")
    text = str(name)
    if not text.strip() or "\x00" in text or len(text) > 4096:
        raise VramplanError(f"model {text[:40]!r} is not a usable name or path", "see `vramplan models` for the list")
    key = text.lower()
    table = _aliases()
    if key in table:
        return _catalogue_spec(table[key])
    path = Path(text).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.exists()  # a FIFO or device "exists": read_text refuses it in one line
    except (OSError, ValueError):  # a name too long to be a path
        is_dir = is_file = False
    if is_dir:
        path = path / "config.json"
        is_file = path.is_file()
        if not path.exists():
            raise VramplanError(f"directory {text} holds no config.json")
    if is_file:
        cfg = read_config_file(path)
        return from_hf_config(cfg, name=cfg.get("_name_or_path") or path.parent.name or path.stem, source=str(path))
    if text.endswith(".json") or "/" in text and not key in table:
        if text.endswith(".json") or text.startswith((".", "/", "~")):
            raise VramplanError(f"no such file {text}")
    raise _unknown_model(text, list(table))


#: What to do about a model the catalogue does not list.
LOCAL_CONFIG_HINT = ("pass its Hugging Face config.json instead: --model path/to/config.json (or the directory "
                     "holding it); `vramplan models` lists the catalogue")


def _family_version(text: str) -> tuple[str, str | None]:
    """``gemma-3-27b`` -> ("gemma", "3"), ``qwen2.5-7b`` -> ("qwen", "2.5"), ``mistral-7b`` -> ("mistral", None).

    A number followed by b/m/k is a size, not a version. An ``org/`` prefix is dropped.
    """
    import re

    t = text.lower().rsplit("/", 1)[-1]
    m = re.match(r"([a-z]+)[-_ ]?(?:(\d+(?:\.\d+)?)(?![\d.]*[bkm](?:$|[-_x])))?", t)
    if not m:
        return "", None
    return m.group(1), m.group(2)


#: words after a version that name a release's flavour, not another model
_FLAVOURS = {"instruct", "chat", "it", "base", "hf", "pt", "thinking"}


def _variant(text: str) -> str | None:
    """The model-line word right after the family and version (``llama-4-maverick`` -> "maverick",
    ``phi-3-mini-4k`` -> "mini"), or None (a size or a flavour such as ``instruct`` follows, or nothing)."""
    import re

    t = text.lower().rsplit("/", 1)[-1]
    m = re.match(r"[a-z]+[-_ ]?(?:\d+(?:\.\d+)?(?![\d.]*[bkm](?:$|[-_x])))?[-_ ]([a-z]+)(?:$|[-_ ])", t)
    if not m or m.group(1) in _FLAVOURS:
        return None
    return m.group(1)


def _unknown_model(text: str, names: list[str]):
    """The unknown-model error: a did-you-mean only among the same family and version.

    ``gemma-3-27b`` must not be answered with ``gemma-2-27b`` (another architecture: other
    layers, attention pattern, vocabulary); when no close name shares the typed family and
    version, the hint says how to plan any model from its ``config.json``.
    """
    import difflib

    from .errors import UnknownNameError

    fam, ver = _family_version(text)
    close = difflib.get_close_matches(text.lower(), [n.lower() for n in names], n=3, cutoff=0.5)
    families = {_family_version(n)[0] for n in names}
    if fam in families:  # a family the catalogue has (else a typo of one: "lama-2-7b")
        close = [c for c in close if _family_version(c)[0] == fam]
    if ver is not None:
        close = [c for c in close if _family_version(c)[1] == ver]
    # llama-4-maverick is not llama-4-scout, stablelm-3b (StableLM-3B-4E1T) not stablelm-alpha-3b: other layouts
    close = [c for c in close if _variant(c) == _variant(text)]
    if close:
        return UnknownNameError(f"unknown model {text!r}", f"did you mean {' or '.join(close)}? or {LOCAL_CONFIG_HINT}")
    return UnknownNameError(f"unknown model {text!r}: not in the catalogue", LOCAL_CONFIG_HINT)
