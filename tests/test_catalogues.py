"""The packaged catalogues: every model and GPU entry parses, resolves and is internally consistent.

Models: the analytic layout (``ModelSpec.params``, ``layer_linears()``) must match what
transformers builds from the same ``config.json`` exactly -- parameter for parameter and
linear for linear -- on the ``meta`` device (no weights, no downloads).
GPUs: every figure carries a source, names and aliases resolve to one card each, and the
feature flags agree with the compute capability.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import fields
from functools import lru_cache

import pytest

from vramplan._data import load_data
from vramplan.errors import UnknownNameError
from vramplan.gpus import GPUSpec, _norm, get_gpu
from vramplan.gpus import catalogue as gpu_catalogue
from vramplan.models import ModelSpec, get_model, size_aliases, supported_model_types
from vramplan.models import catalogue as model_catalogue
from vramplan.units import MIB

MODEL_ENTRIES: list[dict] = load_data("models.json")["models"]
GPU_ENTRIES: list[dict] = load_data("gpus.json")["gpus"]
MODEL_NAMES = [e["name"] for e in MODEL_ENTRIES]
GPU_NAMES = [e["name"] for e in GPU_ENTRIES]

REQUIRED_MODELS = {
    "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.2-1b", "llama-3.2-3b", "llama-3-8b", "llama-3.1-8b",
    "llama-3.1-70b", "mistral-7b-v0.3", "mixtral-8x7b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b",
    "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "phi-3-mini-4k",
    "phi-3.5-mini", "tinyllama-1.1b",
}
SIZE_ALIASES = {
    "1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "7b": "llama-2-7b", "8b": "llama-3.1-8b", "13b": "llama-2-13b",
    "70b": "llama-3.1-70b", "0.5b": "qwen2.5-0.5b", "14b": "qwen2.5-14b", "32b": "qwen2.5-32b", "72b": "qwen2.5-72b",
    "2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b", "1.1b": "tinyllama-1.1b",
}
REQUIRED_GPUS = {
    "rtx3080", "rtx3090", "rtx4090", "rtx5090", "rtx4000ada", "rtxa4000", "rtxa6000", "rtx6000ada", "l4", "l40s",
    "a10g", "t4", "v100-16gb", "v100-32gb", "a100-40gb", "a100-80gb", "h100-pcie", "h100-sxm", "h100-nvl", "h200",
    "b200",
}
# figures that need a source beside them in gpus.json
GPU_FIGURES = ("memory_bytes", "bf16_tflops", "fp16_tflops", "fp32_tflops", "bandwidth_gbs", "compute_capability",
               "sm_count", "nvlink_gbs", "pcie_gbs")


# -- models: the catalogue file ----------------------------------------------------------

def test_model_catalogue_size_and_schema():
    assert load_data("models.json")["schema"] == 1
    assert len(MODEL_ENTRIES) >= 28
    assert REQUIRED_MODELS <= set(MODEL_NAMES)
    assert len(set(MODEL_NAMES)) == len(MODEL_NAMES)
    assert set(model_catalogue()) == set(MODEL_NAMES)


@pytest.mark.parametrize("entry", MODEL_ENTRIES, ids=MODEL_NAMES)
def test_model_entry_parses(entry):
    # "note": what the entry models when that is not the whole checkpoint (Gemma-3's text decoder);
    # "values_from": where each config value was read when config.json itself was read through a copy
    assert {"name", "hf_id", "source", "params", "aliases", "config"} <= set(entry) <= {
        "name", "hf_id", "source", "params", "aliases", "config", "note", "values_from"}
    assert entry["name"] == entry["name"].lower()
    assert entry["source"] == f"https://huggingface.co/{entry['hf_id']}/blob/main/config.json"
    cfg = entry["config"]
    assert cfg["model_type"] in supported_model_types(), "a layout in architectures.toml for every catalogue family"
    assert cfg["architectures"][0].endswith("ForCausalLM")
    spec = model_catalogue()[entry["name"]]
    assert spec.hf_id == entry["hf_id"] and spec.source == entry["source"]
    assert spec.num_heads % spec.num_kv_heads == 0
    # BLOOM's config.json names its depth n_layer (BloomConfig.attribute_map: num_hidden_layers -> n_layer)
    assert spec.hidden_size == cfg["hidden_size"] and spec.num_layers == cfg.get("num_hidden_layers", cfg.get("n_layer"))
    assert get_model(entry["name"]) is spec
    assert get_model(entry["hf_id"]) is spec
    for alias in entry["aliases"]:
        assert get_model(alias) is spec
        assert get_model(alias.upper()) is spec


@pytest.mark.parametrize("entry", MODEL_ENTRIES, ids=MODEL_NAMES)
def test_model_analytic_params_match_catalogue(entry):
    """``ModelSpec.params`` (from the layout) equals the count transformers gives (stored in the entry)."""
    spec = model_catalogue()[entry["name"]]
    assert spec.published_params == entry["params"]
    assert spec.params == entry["params"]
    assert spec.linear_params < spec.params
    assert 0 < spec.active_params <= spec.params
    if spec.is_moe:
        assert spec.active_params < spec.params


def test_model_aliases_unique():
    owners: dict[str, set[str]] = {}
    for e in MODEL_ENTRIES:
        for key in (e["name"], e["hf_id"], *e["aliases"]):
            owners.setdefault(key.lower(), set()).add(e["name"])
    clashes = {k: v for k, v in owners.items() if len(v) > 1}
    assert not clashes
    for e in MODEL_ENTRIES:  # no entry lists the same key twice either
        keys = [k.lower() for k in (e["name"], e["hf_id"], *e["aliases"])]
        assert len(keys) == len(set(keys)), e["name"]


@pytest.mark.parametrize("alias,name", sorted(SIZE_ALIASES.items()))
def test_size_alias_resolves(alias, name):
    assert get_model(alias).name == name
    assert size_aliases()[alias] == name


def test_size_aliases_name_real_sizes():
    """A size shorthand points at a model of roughly that size (gemma-2-2b is 2.6B)."""
    for alias, name in size_aliases().items():
        scale = 1e9 if alias.endswith("b") else 1e6
        nominal = float(alias[:-1]) * scale
        assert 0.75 < model_catalogue()[name].params / nominal < 1.35, (alias, name)


def test_unknown_model_suggests_a_name():
    with pytest.raises(UnknownNameError, match="did you mean"):
        get_model("llama-2-7")


# -- models: against transformers on the meta device ---------------------------------------

@lru_cache(maxsize=None)
def _hf_model(name: str):
    """The HF model transformers builds from the catalogue config, on the meta device."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = dict(model_catalogue()[name].hf_config)
    model_type = cfg.pop("model_type")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(model_type, **cfg)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)


def _decoder_layers(model):
    """The decoder layers wherever the architecture keeps them (model.layers, transformer.h, gpt_neox.layers)."""
    from vramplan.dryrun import decoder_layers

    return decoder_layers(model)


def _layer_linears_hf(layer) -> Counter:
    """(last name, in, out, bias) of every nn.Linear in one decoder layer."""
    from torch import nn

    return Counter((n.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
                   for n, m in layer.named_modules() if isinstance(m, nn.Linear))


def _layer_linears_spec(spec: ModelSpec) -> Counter:
    return Counter((l.name, l.in_features, l.out_features, l.bias) for l in spec.layer_linears() if l.is_linear)


@pytest.mark.torch
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hf_meta_model_param_count(name):
    spec = model_catalogue()[name]
    model = _hf_model(name)
    assert type(model).__name__ == spec.architecture
    assert sum(p.numel() for p in model.parameters()) == spec.params
    layers = _decoder_layers(model)
    assert len(layers) == spec.num_layers
    layer0 = layers[0]
    assert sum(p.numel() for p in layer0.parameters()) == spec.layer_params
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == spec.tie_embeddings


@pytest.mark.torch
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_hf_meta_model_layer_linears(name):
    """The nn.Linear modules of layer 0 are the linear entries of ``layer_linears()``: names (the module's
    last name, as PEFT matches targets), shapes and biases; fused expert banks and the router are parameters."""
    spec = model_catalogue()[name]
    layer0 = _decoder_layers(_hf_model(name))[0]
    hf = _layer_linears_hf(layer0)
    assert hf == _layer_linears_spec(spec)
    assert {n for n, *_ in hf} == {l.name for l in spec.layer_linears() if l.is_linear}
    for lin in spec.layer_linears():
        if lin.is_linear:
            continue
        parent = getattr(layer0, "mlp", None) or layer0.feed_forward  # Llama-4: feed_forward
        try:
            p = parent.get_parameter(lin.name)
        except AttributeError:
            p = parent.get_parameter(f"{lin.name}.weight")
        assert p.numel() == lin.params, lin.name
    for target in spec.lora_targets:
        assert target in {n for n, *_ in hf}, f"default LoRA target {target} is not a Linear of {name}"


# -- GPUs --------------------------------------------------------------------------------

def test_gpu_catalogue_size_and_schema():
    assert load_data("gpus.json")["schema"] == 1
    assert len(GPU_ENTRIES) >= 22
    assert REQUIRED_GPUS <= set(GPU_NAMES)
    assert len(set(GPU_NAMES)) == len(GPU_NAMES)
    assert set(gpu_catalogue()) == set(GPU_NAMES)


@pytest.mark.parametrize("entry", GPU_ENTRIES, ids=GPU_NAMES)
def test_gpu_entry_parses(entry):
    known = {f.name for f in fields(GPUSpec)} - {"custom", "cc"}
    assert set(entry) <= known, set(entry) - known
    spec = gpu_catalogue()[entry["name"]]
    assert isinstance(spec.memory_bytes, int) and spec.memory_bytes > 4 * 1024 * MIB
    assert spec.bf16_tflops > 0 and spec.fp16_tflops >= spec.bf16_tflops and spec.fp32_tflops > 0
    assert spec.fp16_tflops > spec.fp32_tflops
    assert spec.bandwidth_gbs > 0 and spec.sm_count > 0 and spec.pcie_gbs > 0 and spec.nvlink_gbs >= 0
    assert spec.bf16 == (spec.cc >= (8, 0))
    assert spec.flash_attention == (spec.cc >= (8, 0))
    assert spec.arch in ("turing", "volta", "ampere", "ada", "hopper", "blackwell")
    missing = [f for f in GPU_FIGURES if not spec.sources.get(f)]
    assert not missing, f"{spec.name}: no source for {missing}"
    assert set(spec.uncertain) <= set(GPU_FIGURES)
    assert spec.nvml_names, "every card lists the name NVML reports"
    assert get_gpu(spec.display_name) is spec
    for key in (*spec.aliases, *spec.nvml_names):
        assert get_gpu(key) is spec


def test_gpu_names_and_aliases_unique():
    owners: dict[str, set[str]] = {}
    for spec in gpu_catalogue().values():
        for key in (spec.name, spec.display_name, *spec.aliases, *spec.nvml_names):
            owners.setdefault(_norm(key), set()).add(spec.name)
    clashes = {k: v for k, v in owners.items() if len(v) > 1}
    assert not clashes


@pytest.mark.parametrize("text,name", [
    ("RTX 4000 Ada", "rtx4000ada"), ("rtx-4000-ada", "rtx4000ada"), ("NVIDIA RTX 4000 Ada Generation", "rtx4000ada"),
    ("4090", "rtx4090"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("GeForce RTX 3090", "rtx3090"),
    ("h100", "h100-sxm"), ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
    ("a100", "a100-80gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("Tesla T4", "t4"), ("Tesla V100-SXM2-16GB", "v100-16gb"), ("v100", "v100-16gb"), ("A6000", "rtxa6000"),
    ("RTX 6000 Ada", "rtx6000ada"), ("L40S", "l40s"), ("NVIDIA A10G", "a10g"), ("NVIDIA A10", "a10"),
])
def test_gpu_lookup(text, name):
    assert get_gpu(text).name == name


@pytest.mark.parametrize("name,mib", [
    ("rtx3090", 24576), ("rtx4090", 24564), ("rtx4000ada", 20475), ("rtxa6000", 49140), ("l4", 23034),
    ("l40s", 46068), ("a10g", 23028), ("t4", 15360), ("v100-16gb", 16160), ("a100-40gb", 40960),
    ("a100-80gb", 81920), ("h100-sxm", 81559), ("h100-nvl", 95830), ("h200", 143771), ("b200", 183359),
    ("rtx5090", 32607),
])
def test_gpu_memory_is_the_nvidia_smi_total(name, mib):
    """REFERENCE.md's nvidia-smi totals, in bytes -- or, where public PyTorch OOM messages print a smaller
    'total capacity' (what the process can use: vramplan/data/cuda_memory.json), that one."""
    from vramplan.cudamem import usable_bytes

    usable = usable_bytes(name)
    want = mib * MIB if usable is None else min(mib * MIB, usable)
    assert gpu_catalogue()[name].memory_bytes == want


def test_published_usable_capacity_of_t4_and_a100_40gb():
    """A T4's nvidia-smi shows 15360 MiB, PyTorch 14.75 GiB (14.56 GiB with a 2026 driver); an A100 40GB 39.50-39.59
    GiB: the catalogue plans with the smallest published figure, and says where it comes from."""
    cat = gpu_catalogue()
    assert cat["t4"].memory_bytes == int(14.56 * 2**30) // MIB * MIB
    assert cat["a100-40gb"].memory_bytes == int(39.50 * 2**30) // MIB * MIB
    assert "cuda_memory.json" in cat["t4"].sources["memory_bytes"] and "15360 MiB" in cat["t4"].sources["memory_bytes"]


def test_published_context_is_the_median_of_the_cards_messages():
    from vramplan.cudamem import context_bytes, of
    from vramplan.overheads import DEFAULT_CONTEXT_BYTES, default_context

    t4 = sorted(o.non_pytorch_bytes for o in of("t4") if o.non_pytorch_bytes is not None)
    assert len(t4) == 4 and t4[0] < 150 * MIB < t4[-1]          # three ~0.13 GiB, one 1 GiB (custom kernels)
    assert context_bytes("t4") == -(-((t4[1] + t4[2]) / 2) // MIB) * MIB
    assert default_context(gpu_catalogue()["t4"]) == (context_bytes("t4"), "published")
    assert default_context(gpu_catalogue()["h100-sxm"]) == (DEFAULT_CONTEXT_BYTES, "default")


def test_gpu_memory_rtx6000ada_is_the_torch_total():
    """REFERENCE.md: torch reported 50,865,307,648 B on an RTX 6000 Ada (nvidia-smi: 49140 MiB)."""
    assert gpu_catalogue()["rtx6000ada"].memory_bytes == 50_865_307_648


def test_gpu_geforce_runs_fp32_accumulate_at_half_rate():
    """RTX 4090: 165.2 TF with FP32 accumulate = half of 330.3 with FP16 accumulate (REFERENCE.md)."""
    assert get_gpu("rtx4090").bf16_tflops == pytest.approx(330.3 / 2, rel=0.01)
    assert get_gpu("rtx3090").bf16_tflops == pytest.approx(142 / 2, rel=0.01)


def test_pre_ampere_cards_have_no_bf16():
    for name in ("t4", "v100-16gb", "v100-32gb"):
        spec = get_gpu(name)
        assert not spec.bf16 and not spec.flash_attention
        assert spec.bf16_tflops <= spec.fp32_tflops < spec.fp16_tflops


def test_unknown_gpu_suggests_a_name():
    with pytest.raises(UnknownNameError, match="did you mean"):
        get_gpu("rtx4000adaa")
    with pytest.raises(UnknownNameError, match="did you mean"):
        get_gpu("h1000")


@pytest.mark.parametrize("typed", ["gemma-4-27b", "llama-5-scout-17b", "qwen4-8b", "phi-5", "llama-4-maverick-17b-128e",
                                   "phi-1.5"])
def test_unknown_model_of_another_architecture_suggests_a_config_not_a_neighbour(typed):
    with pytest.raises(UnknownNameError) as err:
        get_model(typed)
    text = f"{err.value} {err.value.hint}"
    assert "did you mean" not in text and "config.json" in text


def test_new_models_resolve_to_their_own_architecture():
    assert get_model("gemma-3-27b").model_type == "gemma3_text" and get_model("gemma-3-27b").num_layers == 62
    assert get_model("google/gemma-3-4b-it").name == "gemma-3-4b"
    assert get_model("llama-3.3-70b").hf_id == "meta-llama/Llama-3.3-70B-Instruct"
    assert get_model("mistral-7b-v0.1").vocab_size == 32000


@pytest.mark.parametrize("cfg,words", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12, "n_head": 12,
      "vocab_size": 50257}, "GPT-2 layout"),
    ({"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 768, "num_hidden_layers": 12,
      "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522}, "not a decoder-only causal LM"),
])
def test_unsupported_layouts_say_what_they_are(cfg, words):
    from vramplan.errors import VramplanError
    from vramplan.models import from_hf_config

    with pytest.raises(VramplanError, match=words) as err:
        from_hf_config(cfg, name="x")
    assert "is it a decoder-only" not in str(err.value)


def test_issue15_releases_resolve_by_their_hub_names():
    """DeepSeek-R1 distills, Qwen3 2507 and Llama-4 Scout resolve from their hub ids to their own entries."""
    for hub, name, layers in [("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "deepseek-r1-distill-qwen-7b", 28),
                              ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "deepseek-r1-distill-qwen-14b", 48),
                              ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "deepseek-r1-distill-qwen-32b", 64),
                              ("Qwen/Qwen3-4B-Instruct-2507", "qwen3-4b-2507", 36),
                              ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3-30b-a3b-2507", 48),
                              ("Qwen/Qwen3-235B-A22B-Instruct-2507", "qwen3-235b-a22b-2507", 94),
                              ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama-4-scout-17b-16e", 48)]:
        spec = get_model(hub)
        assert spec.name == name and spec.num_layers == layers
    assert get_model("qwen3-4b-2507").max_position_embeddings == 262144
    scout = get_model("llama-4-scout")
    assert scout.is_moe and scout.dense_experts and 17.0e9 < scout.active_params < 17.3e9  # "17B" active


def test_llama4_maverick_config_is_refused_with_the_reason():
    from vramplan.errors import VramplanError
    from vramplan.models import from_hf_config

    cfg = dict(get_model("llama-4-scout").hf_config, interleave_moe_layer_step=2, num_local_experts=128)
    with pytest.raises(VramplanError, match="alternate dense and MoE"):
        from_hf_config(cfg, name="maverick")


@pytest.mark.parametrize("name,kind,parallel,mlp,norms", [
    ("phi-2", "layer", True, "plain", 1), ("falcon-7b", "layer", True, "plain", 1),
    ("stablelm-base-alpha-3b", "layer", True, "plain", 2), ("llama-2-7b", "rms", False, "gated", 2)])
def test_layouts_parse(name, kind, parallel, mlp, norms):
    spec = get_model(name)
    assert (spec.norm_kind, spec.parallel_block, spec.mlp_kind, spec.norms_per_layer) == (kind, parallel, mlp, norms)


def test_falcon_flags_follow_its_config():
    from vramplan.errors import VramplanError
    from vramplan.models import from_hf_config

    base = dict(get_model("falcon-7b").hf_config)
    assert get_model("falcon-7b").num_kv_heads == 1 and get_model("falcon-7b").sdpa_math
    new = from_hf_config(dict(base, new_decoder_architecture=True, num_kv_heads=71), name="f")
    assert new.num_kv_heads == 71 and new.norms_per_layer == 2 and not new.sdpa_math
    seq = from_hf_config(dict(base, parallel_attn=False), name="f")
    assert not seq.parallel_block and seq.norms_per_layer == 2
    with pytest.raises(VramplanError, match="ALiBi"):
        from_hf_config(dict(base, alibi=True), name="f")


def test_every_architecture_layout_key_is_read_and_documented():
    """No dead data: each key an ``architectures.toml`` entry sets is read somewhere in the package (the loader,
    ``vramplan/models.py``, or a reader of ``models.layout_of``) and described in the file's header."""
    import re

    from vramplan._data import DATA_DIR

    source = "\n".join(p.read_text(encoding="utf-8") for p in (DATA_DIR.parent).rglob("*.py"))
    header = (DATA_DIR / "architectures.toml").read_text(encoding="utf-8").split("\n[", 1)[0]
    keys = {k for entry in load_data("architectures.toml").values() for k in entry}
    assert keys
    assert not {k for k in keys if f'"{k}"' not in source}, "keys no loader reads"
    assert not {k for k in keys if not re.search(rf"^#.*\b{k}\b", header, re.M)}, "keys the header does not describe"
