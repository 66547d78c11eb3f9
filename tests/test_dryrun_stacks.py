"""The dry run per training stack: traced (the stack's own code), emulated (Liger's loss), documented (Unsloth).

Tiny configs built in code, on meta. The torchtune and litgpt runs need their extras
(``pip install -e '.[torchtune]'`` / ``'.[litgpt]'``) and are skipped without them.
"""

import importlib
import json
import sys

import pytest

from conftest import TINY_LLAMA
from vramplan.errors import install_hint

from vramplan.cli import main
from vramplan.dryrun import stack_run
from vramplan.errors import MissingDependencyError, VramplanError
from vramplan.stacks import stacks
from vramplan.taxonomy import Component as C

# a big vocabulary next to a small model: the logits dominate, so the loss implementation shows
TINY = dict(TINY_LLAMA, vocab_size=32000)
B, S = 2, 64


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


# -- labels (no torch needed) -------------------------------------------------------------------------
def test_catalogue_labels_every_stack():
    assert {n: s.dryrun for n, s in stacks().items()} == {
        "hf": "traced", "torchtune": "traced", "litgpt": "traced", "unsloth": "documented",
        "fsdp_qlora": "documented"}
    assert stack_run("hf") == "traced"
    assert stack_run("torchtune") == "traced"
    assert stack_run("hf", ("liger_ce",)) == "emulated"
    with pytest.raises(VramplanError, match="does not run technique act_offload"):
        stack_run("hf", ("act_offload",))
    with pytest.raises(VramplanError, match="does not run technique liger_ce on the torchtune"):
        stack_run("torchtune", ("liger_ce",))


def test_documented_stack_is_refused_in_one_line(capsys):
    with pytest.raises(VramplanError, match="vramplan estimate --framework unsloth"):
        stack_run("unsloth")
    _one_line_error(capsys, ["dryrun", "--model", "llama-3-8b", "--framework", "unsloth"],
                    "cannot trace the unsloth stack", "CUDA", "`vramplan estimate --framework unsloth`")


@pytest.mark.parametrize("stack", ["torchtune", "litgpt"])
def test_missing_stack_package_exits_2_with_the_pip_hint(capsys, monkeypatch, stack):
    monkeypatch.setitem(sys.modules, stack, None)  # importing it fails, find_spec finds nothing
    _one_line_error(capsys, ["dryrun", "--model", "llama-3-8b", "--framework", stack],
                    f"needs the {stack} package", install_hint(stack))  # pip install -e "...[stack]" in a checkout


@pytest.mark.parametrize("stack,precision", [("hf", "bf16-mixed"), ("torchtune", "bf16"), ("litgpt", "bf16")])
def test_a_card_keeps_the_stacks_default_precision(monkeypatch, stack, precision):
    """With --gpu and no --precision the dry run runs the stack's default (as estimate does), not hf's."""
    import vramplan.dryrun as dr

    monkeypatch.setattr(dr, "require_stack_packages", lambda framework="hf": None)
    monkeypatch.setattr(dr, "dryrun_config", lambda spec, cfg, card, **kw: cfg)
    assert dr.dryrun("llama-3.2-1b", "lora", framework=stack, gpu="rtx4090").precision == precision


# -- with torch ------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from vramplan.config import make_config  # noqa: E402
from vramplan.dryrun import dryrun  # noqa: E402
from vramplan.models import from_hf_config  # noqa: E402
from vramplan.runtime import build  # noqa: E402
from vramplan.runtime import liger  # noqa: E402


def _importable(*mods) -> bool:
    try:
        from vramplan.runtime.stacks import get_runtime
        from vramplan.runtime.stacks.common import require_package

        require_package(get_runtime(mods[0]))
        return True
    except (MissingDependencyError, ImportError):
        return False


needs_torchtune = pytest.mark.skipif(not _importable("torchtune"), reason="the torchtune extra is not installed")
needs_litgpt = pytest.mark.skipif(not _importable("litgpt"), reason="the litgpt extra is not installed")


@pytest.fixture(scope="module")
def spec():
    return from_hf_config(TINY, name="tiny-llama-bigvocab")


@pytest.fixture(scope="module")
def hf(spec):
    return dryrun(spec, "lora", batch=B, seq=S)


def test_the_broken_import_names_torchao(monkeypatch):
    from vramplan.runtime.stacks import common as frameworks, get_runtime

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "torchtune":
            raise ImportError("cannot import name 'int4_weight_only' from 'torchao.quantization'")
        return real(name, *a, **k)

    monkeypatch.setattr(frameworks.importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(frameworks.importlib, "import_module", fake)
    with pytest.raises(MissingDependencyError, match=r"does not import .*torchao >= 0.16, < 0.18"):
        frameworks.require_package(get_runtime("torchtune"))


def test_hf_result_says_traced(hf):
    assert (hf.stack, hf.run, hf.emulated) == ("hf", "traced", [])
    j = hf.to_json()["stack"]
    assert j["name"] == "hf" and j["run"] == "traced" and "transformers" in j["packages"] and j["sources"]
    assert "hf stack traced" in hf.stack_line
    assert hf.assumptions[0].startswith("dry run (hf stack, traced)")


# -- Liger: emulated --------------------------------------------------------------------------------------
def test_liger_chunk_rule():
    assert liger.chunk_rows(4096, 4096, 128256) == 128  # ceil(V/H) = 32 -> 4096/32 = 128 rows
    assert liger.chunk_rows(100, 64, 32000) == 1  # ceil(100/500) = 1
    assert liger.chunk_rows(10, 4096, 4096) == 10  # one chunk, never more than the rows


def test_liger_emulation_is_cross_entropy_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 24, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 300, (2, 24), generator=g)
    labels[0, 3] = liger.IGNORE_INDEX
    loss = liger.causal_lm_loss(h, w, labels)
    (0.5 * loss).backward()  # a non-unit incoming gradient is applied to the saved gradients
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy((h @ w.t())[:, :-1].reshape(-1, 300), labels[:, 1:].reshape(-1))
    (0.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, h.grad)
    torch.testing.assert_close(gw, w.grad)


def test_liger_dry_run_is_emulated_and_holds_no_logits(spec, hf):
    res = dryrun(spec, "lora", batch=B, seq=S, techniques="liger_ce")
    assert (res.stack, res.run) == ("hf", "emulated")
    assert res.emulated and "Liger" in res.emulated[0]
    j = res.to_json()["stack"]
    assert j["run"] == "emulated" and any("liger_kernel" in s for s in j["sources"])
    assert "emulated" in res.stack_line and "reimplementation" in res.stack_line
    assert res.components[C.LOGITS] < 0.05 * hf.components[C.LOGITS]
    assert res.tensor_peak_bytes < 0.5 * hf.tensor_peak_bytes


# -- torchtune: traced with its own code -------------------------------------------------------------
@needs_torchtune
def test_torchtune_is_traced_pure_bf16_and_below_hf(spec, hf):
    tt = dryrun(spec, "lora", batch=B, seq=S, framework="torchtune")
    assert (tt.stack, tt.run) == ("torchtune", "traced")
    assert "torchtune" in tt.packages and "torchtune stack traced" in tt.stack_line
    assert any("CEWithChunkedOutputLoss" in a for a in tt.assumptions)
    assert tt.trainable_params == hf.trainable_params
    assert tt.components[C.ADAPTERS] * 2 == hf.components[C.ADAPTERS]  # bf16 adapters, PEFT's are fp32
    assert tt.components[C.AUTOCAST_CACHE] == 0  # no autocast
    # chunked loss over bf16 logits: no whole fp32 copy of the logits as HF's ForCausalLMLoss makes
    assert tt.components[C.LOGITS] < 0.75 * hf.components[C.LOGITS]
    assert tt.tensor_peak_bytes < hf.tensor_peak_bytes


@needs_torchtune
def test_torchtune_builds_its_own_modules_in_bf16(spec):
    cfg = make_config(spec, "lora", batch=1, seq=16, framework="torchtune")
    t = build(spec, cfg, "cuda", fake=True)
    model = t.policy
    assert type(model).__module__.startswith("torchtune.")
    assert {p.dtype for p in t.trainable_parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert type(t.optimizer).__name__ == "FusedAdamWOnMeta"  # the configs' AdamW(fused=True)


@needs_torchtune
def test_torchtune_qlora_counts_nf4_weights():
    qspec = from_hf_config(dict(TINY, hidden_size=256, intermediate_size=1024, vocab_size=4096), name="tiny-256")
    lora = dryrun(qspec, "lora", batch=1, seq=32, framework="torchtune")
    qlora = dryrun(qspec, "qlora", batch=1, seq=32, framework="torchtune")
    assert qlora.run == "traced"
    assert 0 < qlora.components[C.QUANT_STATE] < qlora.components[C.WEIGHTS] < lora.components[C.WEIGHTS]


@needs_torchtune
def test_torchtune_rejects_what_its_recipes_do_not_run(spec):
    with pytest.raises(VramplanError, match="not ia3"):
        dryrun(spec, "ia3", framework="torchtune")
    with pytest.raises(VramplanError, match="one dtype"):
        dryrun(spec, "lora", framework="torchtune", precision="bf16-mixed")
    with pytest.raises(VramplanError, match="MLP as a whole"):
        dryrun(spec, "lora", framework="torchtune", targets="q_proj,gate_proj")


# the analytic model held to the torchtune dry run (benchmarks/dryrun_vs_analytic.py --framework torchtune):
# one row per torchtune-only term of stacks.toml -- k/v expanded for GQA and one RoPE cache per layer
# (lora_llama3), torchao NF4 dequantisation and adapted-only quantisation (lora_qwen2), the head's chunked
# weight gradient and fp32 RMSNorm of a trainable model (tied llama3_2), a held-out family with checkpointing
TORCHTUNE_ROWS = [("llama-3-8b", "lora", False, "2k"), ("qwen2.5-7b", "qlora", False, "short"),
                  ("llama-3.2-3b", "full", False, "2k"), ("mistral-7b-v0.3", "lora", True, "2k"),
                  ("llama-3-8b", "dora", True, "2k")]


def _benchmark():
    from conftest import load_benchmark

    return load_benchmark("dryrun_vs_analytic")


# -- litgpt: traced with its own code -------------------------------------------------------------------
@needs_litgpt
def test_litgpt_is_traced_bf16_true(spec, hf):
    lit = dryrun(spec, "lora", batch=B, seq=S, framework="litgpt")
    assert (lit.stack, lit.run) == ("litgpt", "traced")
    assert json.loads(json.dumps(lit.to_json()))["stack"]["packages"]["litgpt"]
    assert lit.components[C.ADAPTERS] * 2 == hf.components[C.ADAPTERS]
    assert lit.tensor_peak_bytes < hf.tensor_peak_bytes


# the analytic model held to the litgpt dry run (benchmarks/dryrun_vs_analytic.py --framework litgpt): one row
# per litgpt-only term of stacks.toml -- the bf16 loss in 128-token chunks, k/v expanded for GQA and the zero-padded
# q/v LoRA output (lora 2k), the untied lm_head of a tied checkpoint (llama-3.2-3b), a held-out family
LITGPT_ROWS = [("llama-3-8b", "lora", False, "2k"), ("qwen2.5-7b", "lora", False, "short"),
               ("llama-3.2-3b", "full", False, "2k"), ("llama-3.2-3b", "lora", False, "short"),
               ("mistral-7b-v0.3", "lora", False, "2k")]


STACK_ROWS = ([pytest.param("torchtune", *r, marks=needs_torchtune, id=f"torchtune-{r}") for r in TORCHTUNE_ROWS]
              + [pytest.param("litgpt", *r, marks=needs_litgpt, id=f"litgpt-{r}") for r in LITGPT_ROWS])


@pytest.mark.parametrize("framework,arch,method,gc,shape", STACK_ROWS)
def test_stack_analytic_within_two_percent_of_dryrun(framework, arch, method, gc, shape):
    row = _benchmark().run_row(arch, method, gc, shape, layers=2, framework=framework)
    assert not row.error_text and not row.skipped, row.error_text or row.skipped
    assert abs(row.error) <= 0.02, (
        f"{arch} {method} gc={gc} {shape}: estimate {row.estimate} vs dry run {row.dryrun} B "
        f"({100 * row.error:+.2f}%); largest component difference {row.worst} {row.worst_bytes:+d} B")


def test_every_stack_the_dry_run_runs_has_one_runtime_module():
    """stacks.toml picks the module (vramplan/runtime/stacks/<name>.py); a documented stack has none."""
    from vramplan.runtime.stacks import StackRuntime, get_runtime

    for name, st in stacks().items():
        if st.dryrun == "documented":
            with pytest.raises(VramplanError, match="cannot run here"):
                get_runtime(name)
        else:
            rt = get_runtime(name)
            assert isinstance(rt, StackRuntime) and rt.name == name
            assert type(rt).__module__ == f"vramplan.runtime.stacks.{name}"


def test_a_stack_refuses_a_method_its_recipes_do_not_train(spec):
    from vramplan.runtime.stacks import get_runtime

    for fw in ("torchtune", "litgpt"):
        with pytest.raises(VramplanError, match="single-device fine-tuning recipes"):
            get_runtime(fw).check(spec, make_config(spec, "dpo", adapter="lora", batch=1, seq=16,
                                                    precision="bf16", framework=fw))
