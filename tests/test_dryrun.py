"""The dry run: tensor accounting on meta, checked against hand counts, PEFT, real CPU steps and physics."""

import gc
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import TINY_LLAMA  # noqa: E402
from vramplan.config import make_config  # noqa: E402
from vramplan.dryrun import DryRunResult, dryrun  # noqa: E402
from vramplan.dryrun.tracker import Tracker  # noqa: E402
from vramplan.errors import MissingDependencyError, VramplanError  # noqa: E402
from vramplan.models import from_hf_config  # noqa: E402
from vramplan.quant import nf4_bytes  # noqa: E402
from vramplan.results import Estimate  # noqa: E402
from vramplan.runtime import build  # noqa: E402
from vramplan.taxonomy import TENSOR_COMPONENTS, Component, Group, Phase  # noqa: E402

TINY = dict(TINY_LLAMA)
B, S = 2, 64


@pytest.fixture(scope="module")
def spec():
    return from_hf_config(TINY, name="tiny-llama")


@pytest.fixture(scope="module")
def lora(spec):
    return dryrun(spec, "lora", batch=B, seq=S)


def _tensor_sum(res):
    return sum(v for c, v in res.components.items() if c.is_tensor)


# -- the tracker itself -------------------------------------------------------------------------------
def test_tracker_live_bytes_match_a_hand_count():
    tr = Tracker("meta")
    with tr.mode:
        lin = torch.nn.Linear(32, 16, device="meta")  # weight 16x32 fp32 + bias 16
        assert tr.live_bytes == 4 * (16 * 32 + 16)
        x = torch.empty(8, 32, device="meta", requires_grad=True)
        base = tr.live_bytes
        y = lin(x)  # addmm output 8x16
        assert tr.live_bytes == base + 4 * 8 * 16
        v = y.view(16, 8)  # a view: no new storage
        y.add_(1)  # in place: no new storage
        assert tr.live_bytes == base + 4 * 8 * 16
        z = (y * 2).sum()
        del v
        assert tr.live_bytes == base + 4 * 8 * 16 + 4  # y*2 died, the scalar lives
        z.backward()  # grads: x 8x32, weight 16x32, bias 16
        assert lin.weight.grad is not None and x.grad is not None
        expected = base + 4 * 8 * 16 + 4 + 4 * (8 * 32 + 16 * 32 + 16)
        assert tr.live_bytes == expected
        del y, z
        lin.weight.grad = None
        assert tr.live_bytes == expected - 4 * 8 * 16 - 4 - 4 * 16 * 32
        st = x.untyped_storage()
        st.resize_(0)  # storages resized outside ops are seen at their next use by an op
    assert tr.peak.bytes == -1  # nothing measured outside a measured step


def test_tracker_peak_and_breakdown_at_the_peak():
    tr = Tracker("meta")
    with tr.mode:
        tr.start_measure()
        tr.phase(Phase.FORWARD)
        a = torch.empty(1000, device="meta")  # 4000 B
        tr.tag(a, Component.WEIGHTS)
        b = torch.empty(500, device="meta")  # 2000 B, dies before the forward ends
        c = torch.empty(250, device="meta")  # 1000 B, outlives the forward: an activation
        del b
        tr.phase(Phase.BACKWARD)
        d = torch.empty(100, device="meta")  # 400 B, a temporary of backward
        del d
        tr.stop()
    assert tr.peak.bytes == 7000
    at_peak = tr.breakdown(tr.peak.at)
    assert at_peak == {Component.WEIGHTS: 4000, Component.TEMPORARIES: 2000, Component.ACTIVATIONS: 1000}
    assert tr.phase_peaks[Phase.FORWARD].bytes == 7000 and tr.phase_peaks[Phase.BACKWARD].bytes == 5400
    del a, c


def test_tracker_ignores_other_devices():
    tr = Tracker("meta")
    with tr.mode:
        cpu = torch.ones(1000)  # a CPU tensor is not device memory of the emulated GPU
        assert tr.live_bytes == 0
    del cpu


# -- exact byte counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("precision,nbytes", [("bf16", 2), ("bf16-mixed", 4), ("fp32", 4)])
def test_full_weights_are_numel_times_dtype(spec, precision, nbytes):
    res = dryrun(spec, "full", batch=1, seq=16, precision=precision)
    assert res.params == spec.params
    assert res.phases[Phase.LOAD] == spec.params * nbytes + 4 * (spec.head_dim // 2) * 2  # + rotary inv_freq buffers
    assert res.components[Component.WEIGHTS] == res.phases[Phase.LOAD]
    # AdamW: two states in the parameter dtype, plus fused AdamW's fp32 step on the device
    n_tensors = sum(1 for _ in build(spec, res.config, "cuda", fake=True).trainable_parameters())
    assert res.components[Component.OPTIMIZER_STATES] == 2 * spec.params * nbytes + (
        4 * n_tensors if res.config.precision != "bf16" else 0)


def test_lora_bytes(spec, lora):
    cfg = lora.config
    shapes = {l.name: l for l in spec.layer_linears()}
    adapters = spec.num_layers * sum(cfg.rank * (shapes[t].in_features + shapes[t].out_features) for t in cfg.targets)
    assert lora.trainable_params == adapters
    assert lora.components[Component.ADAPTERS] == 4 * adapters  # fp32 adapters
    assert lora.components[Component.WEIGHTS] == 2 * spec.params + 4 * spec.head_dim  # bf16 base + inv_freq buffers
    assert lora.components[Component.OPTIMIZER_STATES] == 2 * 4 * adapters + 4 * 2 * len(cfg.targets) * spec.num_layers


def test_qlora_weights_are_nf4_plus_fp32_rest(spec):
    pytest.importorskip("bitsandbytes")
    res = dryrun(spec, "qlora", batch=1, seq=16)
    linear = [l.in_features * l.out_features for l in spec.layer_linears()] * spec.num_layers
    w = sum(nf4_bytes(n, True)[0] for n in linear)
    q = sum(nf4_bytes(n, True)[1] for n in linear)
    rest = spec.params - sum(linear)  # embeddings, norms, lm_head: upcast to fp32 by prepare_model_for_kbit_training
    assert res.components[Component.QUANT_STATE] == q
    assert res.components[Component.WEIGHTS] == w + 4 * rest + 4 * spec.head_dim
    assert res.params == spec.params


def test_components_sum_to_the_peak_and_groups_agree(lora):
    assert _tensor_sum(lora) == lora.tensor_peak_bytes
    assert sum(v for g, v in lora.groups.items() if g is not Group.RUNTIME) == lora.tensor_peak_bytes
    assert lora.peak_bytes == lora.tensor_peak_bytes + sum(v for c, v in lora.components.items() if not c.is_tensor)
    assert lora.phases[lora.peak_phase] == lora.tensor_peak_bytes
    for p, comps in lora.phase_components.items():
        assert sum(comps.values()) == lora.phases[p]


def test_overheads_get_the_paged_states_and_the_method_but_no_activation_factor(spec, monkeypatch):
    """The measured tensor peak goes through vramplan.overheads' chain with the method (its profile
    figures) and the paged optimiser states (no allocator reserve on them), but no activations: the
    activation factor corrects the analytic model, not the dry run's measurement."""
    from vramplan import overheads
    from vramplan.profiles import AllocatorModel, Fitted, Profile

    mib = 1 << 20
    plain = dryrun(spec, "full", batch=B, seq=S, optimizer="adamw_8bit", gpu="a100-80gb")
    paged = dryrun(spec, "full", batch=B, seq=S, optimizer="paged_adamw_8bit", gpu="a100-80gb")
    t, states = paged.tensor_peak_bytes, paged.components[Component.OPTIMIZER_STATES]
    assert states > 0 and (t, states) == (plain.tensor_peak_bytes, plain.components[Component.OPTIMIZER_STATES])
    assert plain.components[Component.ALLOCATOR_RESERVE] == int(overheads.DEFAULT_RESERVE_FRACTION * t)
    assert paged.components[Component.ALLOCATOR_RESERVE] == int(overheads.DEFAULT_RESERVE_FRACTION * (t - states))
    assert any("paged optimizer states" in a for a in paged.assumptions)
    # a profile calibrating every figure: the method's allocator correction applies, its activation factor does not
    prof = Profile(gpu="a100-80gb", device={"kind": "cuda", "compute_capability": "8.0"}, versions={},
                   created="2026-11-23T00:00:00Z", source="a100-80gb.jsonl", source_info={},
                   allocated_source="torch.cuda", context=Fitted(400 * mib, 3), workspace=Fitted(16 * mib, 2),
                   allocator=AllocatorModel(1.1, 64 * mib, by_method={"full": 1.05}),
                   activation_factors={"full": Fitted(1.5, 3)})
    monkeypatch.setattr(overheads, "card_profile", lambda gpu: prof)
    cal = dryrun(spec, "full", batch=B, seq=S, optimizer="paged_adamw_8bit", gpu="a100-80gb")
    assert cal.tensor_peak_bytes == t and cal.calibrated
    assert cal.peak_bytes == 400 * mib + prof.reserved_bytes(t - states + 16 * mib, "full") + states
    assert prof.reserved_bytes(t - states + 16 * mib, "full") != prof.reserved_bytes(t - states + 16 * mib)
    line = next(a for a in cal.assumptions if a.startswith("runtime overheads:"))
    assert "activation factor (1.5) is not applied" in line


def test_json_has_the_estimate_keys(lora):
    j = lora.to_json()
    assert isinstance(lora, Estimate) and isinstance(lora, DryRunResult)
    for key in ("model", "params", "trainable_params", "peak_bytes", "peak_gib", "tensor_peak_bytes", "components",
                "phases", "groups", "layer"):
        assert key in j
    assert set(j["components"]) >= {c.value for c in TENSOR_COMPONENTS}
    j = dryrun(TINY_SPEC(), "lora", batch=1, seq=16, gpu_mem="24GiB").to_json()
    assert j["capacity_bytes"] == 24 * 2**30 and j["fits"] is True


def TINY_SPEC():
    return from_hf_config(TINY, name="tiny-llama")


# -- the truth on CPU: meta kernels allocate what real kernels allocate ---------------------------------
def _trace(spec, cfg, fake):
    tr = Tracker("meta" if fake else "cpu", workspaces=False)
    with tr.mode:
        t = build(spec, cfg, "cpu", fake=fake, hooks=tr)
        tr.phase(None)
        t.step()
        gc.collect()
        tr.start_measure()
        t.step()
        tr.stop()
    return tr.peak.bytes, {p: pk.bytes for p, pk in tr.phase_peaks.items()}


CPU_CASES = [("full", None, {}), ("lora", None, {}), ("lora", None, {"grad_ckpt": True}), ("dora", None, {}),
             ("ia3", None, {}), ("dpo", "full", {}), ("ppo", "lora", {}), ("full", None, {"optimizer": "adafactor"})]


@pytest.mark.parametrize("method,adapter,kw", CPU_CASES, ids=lambda x: str(x))
def test_meta_accounting_equals_real_cpu_tensors(spec, method, adapter, kw):
    """Without autocast and fused attention (fp32, eager) a real CPU step and the meta step allocate the same."""
    cfg = make_config(spec, method, adapter=adapter, batch=B, seq=32, precision="fp32", attn="eager", **kw)
    assert _trace(spec, cfg, fake=True) == _trace(spec, cfg, fake=False)


# -- physics --------------------------------------------------------------------------------------------
def test_peak_grows_with_batch_and_accumulation(spec):
    peaks = [dryrun(spec, "lora", batch=b, seq=S).tensor_peak_bytes for b in (1, 2, 4)]
    assert peaks[0] < peaks[1] < peaks[2]
    one, two = (dryrun(spec, "full", batch=1, seq=S, grad_accum=g) for g in (1, 2))
    assert two.components[Component.GRADIENTS] > 0 == one.components.get(Component.GRADIENTS, 0)
    assert two.tensor_peak_bytes > one.tensor_peak_bytes


def test_gradient_checkpointing_lowers_activations(spec, lora):
    ckpt = dryrun(spec, "lora", batch=B, seq=S, grad_ckpt=True)
    assert ckpt.components[Component.ACTIVATIONS] < lora.components[Component.ACTIVATIONS]
    assert ckpt.tensor_peak_bytes < lora.tensor_peak_bytes
    # a middle layer (of 4) keeps its bf16 output, the next checkpoint's input; its recomputation holds
    # exactly what it saves without checkpointing
    deep = from_hf_config(dict(TINY, num_hidden_layers=4), name="tiny-4l")
    plain = dryrun(deep, "lora", batch=B, seq=S, sample_layer=1).layer
    ckpt = dryrun(deep, "lora", batch=B, seq=S, grad_ckpt=True, sample_layer=1).layer
    assert ckpt["saved"]["components"] == {"activations": B * S * spec.hidden_size * 2}
    assert ckpt["recomputed"] == plain["saved"]


def test_flash_attention_saves_out_and_fp32_logsumexp(spec, lora):
    ops = lora.layer["saved"]["ops"]
    flash = ops["self_attn:aten::_scaled_dot_product_flash_attention"]
    heads, d = spec.num_heads, spec.head_dim
    assert flash == B * S * heads * d * 2 + 4 * B * heads * S + 16 + 8  # out bf16, lse fp32, philox seed/offset
    assert lora.extra["sdpa_backends"] == {"flash": 2 * spec.num_layers}  # warm-up + measured forward


def test_sdpa_backend_choice(spec):
    fp32 = dryrun(spec, "lora", batch=1, seq=S, precision="fp32")  # fp32 + grouped heads: the math path
    assert set(fp32.extra["sdpa_backends"]) == {"math"}
    mha = from_hf_config(dict(TINY, num_key_value_heads=4), name="tiny-mha")
    assert set(dryrun(mha, "lora", batch=1, seq=S, precision="fp32").extra["sdpa_backends"]) == {"efficient"}


def test_eager_attention_is_quadratic(spec):
    def layer_bytes(attn, seq):
        return dryrun(spec, "lora", batch=1, seq=seq, attn=attn).layer["saved"]["components"]["activations"]

    assert abs(layer_bytes("sdpa", 128) - 2 * layer_bytes("sdpa", 64)) <= 24  # linear (philox seed/offset aside)
    assert layer_bytes("eager", 128) > 2.5 * layer_bytes("eager", 64)


def test_autocast_caches_weight_casts(spec):
    res = dryrun(spec, "full", batch=1, seq=16, precision="bf16-mixed")
    fwd = res.phase_components[Phase.FORWARD]
    matmul_weights = spec.linear_params + spec.lm_head_params  # every nn.Linear weight, cast once per step
    assert fwd[Component.AUTOCAST_CACHE] == 2 * matmul_weights
    assert Component.AUTOCAST_CACHE not in dryrun(spec, "full", batch=1, seq=16, precision="bf16").components or \
        dryrun(spec, "full", batch=1, seq=16, precision="bf16").components[Component.AUTOCAST_CACHE] == 0


def test_methods_and_architectures_run(spec):
    dpo = dryrun(spec, "dpo", adapter="lora", batch=1, seq=S)
    sft = dryrun(spec, "lora", batch=1, seq=S)
    assert dpo.tensor_peak_bytes > sft.tensor_peak_bytes and dpo.layer["tokens"] == 2 * S
    ppo = dryrun(spec, "ppo", adapter="lora", batch=1, seq=S)
    roll = ppo.phase_components[Phase.ROLLOUT]
    cache = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * (S - 1) * 2  # bf16 K and V, seq - 1 tokens
    scores = (S // 2) * spec.vocab_size * 4  # one fp32 score row per response token
    assert roll[Component.KV_CACHE] == cache + 2 * scores  # the score list and its stack, with the cache alive
    tied = from_hf_config(dict(TINY, tie_word_embeddings=True), name="tiny-tied")
    t = dryrun(tied, "full", batch=1, seq=16, precision="bf16")
    assert t.components[Component.WEIGHTS] == 2 * tied.params + 4 * tied.head_dim  # the tied matrix counted once
    moe = from_hf_config(dict(TINY, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2), name="tiny-moe")
    m = dryrun(moe, "lora", batch=1, seq=16)
    assert m.params == moe.params and m.tensor_peak_bytes > 0


def test_missing_dependency_is_one_clean_error(monkeypatch, spec):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingDependencyError, match="peft"):
        dryrun(spec, "lora", batch=1, seq=16)


def test_paged_adamw_32bit_dry_run_matches_the_analytic_states():
    pytest.importorskip("bitsandbytes")
    kw = dict(optimizer="paged_adamw_32bit", precision="bf16", seq=128)
    d = dryrun("smollm2-135m", "full", **kw)
    a = vramplan_estimate("smollm2-135m", "full", **kw)
    assert abs(d.tensor_peak_bytes - a.tensor_peak_bytes) <= 0.01 * a.tensor_peak_bytes


def vramplan_estimate(*args, **kw):
    import vramplan

    return vramplan.estimate(*args, **kw)


def test_unsupported_transformers_is_one_clear_line(monkeypatch, spec, capsys):
    """A transformers older than the extras allow is refused in one line (exit 2), not a traceback."""
    import importlib.metadata as md

    import importlib

    from vramplan.cli import main

    b = importlib.import_module("vramplan.runtime.build")

    real = md.version
    monkeypatch.setattr(md, "version", lambda pkg: "5.0.0" if pkg == "transformers" else real(pkg))
    with pytest.raises(VramplanError, match=r"transformers 5\.0\.0 is not supported .*>= 5\.3"):
        b.check_versions()
    assert main(["dryrun", "--model", "smollm2-360m", "--method", "lora", "--seq", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "transformers 5.0.0 is not supported" in err[0] and "Traceback" not in "\n".join(err)
    assert b.release("5.3.0.dev0+cpu") == (5, 3, 0) and b.release("0.18.1") == (0, 18, 1)
