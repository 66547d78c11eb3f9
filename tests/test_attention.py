"""The attention definitions (``vramplan.attention``): what renderings and listings read instead of names."""

from types import SimpleNamespace

import pytest

from vramplan.attention import KERNELS, attention_kernel
from vramplan.config import make_config
from vramplan.errors import UnknownNameError, VramplanError
from vramplan.models import get_model
from vramplan.render import plan_brief
from vramplan.request import ATTENTION, ConfigRequest


def test_a_request_accepts_exactly_the_defined_kernels_and_defaults_to_the_default_one():
    for name in KERNELS:
        assert ConfigRequest(attn=name).attn == name
    with pytest.raises(VramplanError):
        ConfigRequest(attn="xformers")
    assert ATTENTION == tuple(KERNELS)  # the CLI's and the API's choices, in the definitions' order
    assert [k.name for k in KERNELS.values() if k.default] == [ConfigRequest.attn]
    for k in KERNELS.values():
        if k.same_as is not None:  # ties a kernel that is itself listed
            assert attention_kernel(k.same_as).same_as is None and k.same_as != k.name


def test_unknown_kernel_is_a_named_error():
    with pytest.raises(UnknownNameError, match="unknown attention implementation 'flsh'"):
        attention_kernel("flsh")


@pytest.mark.parametrize("attn", sorted(KERNELS))
def test_plan_brief_names_every_kernel_but_the_default(attn):
    cfg = make_config(get_model("llama-3.2-1b"), "lora", batch=2, attn=attn)
    brief = plan_brief(SimpleNamespace(config=cfg, parallel=SimpleNamespace(distributed=False)))
    assert (attn in brief.split(", ")) == (not attention_kernel(attn).default), brief


# -- the sites read the definition, never the name --------------------------------------------------------------

import dataclasses  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from vramplan.attention import AttentionKernel  # noqa: E402
from vramplan.memory import step_terms  # noqa: E402
from vramplan.methods.grpo import nograd_layer_work  # noqa: E402
from vramplan.throughput import step_work  # noqa: E402
from vramplan.gpus import get_gpu  # noqa: E402
from vramplan.planner.checks import check_card  # noqa: E402
from vramplan.planner.estimating import estimate_config  # noqa: E402

PACKAGE = Path(__file__).resolve().parent.parent / "vramplan"


def test_every_attribute_of_a_kernel_is_read_by_the_package():
    """Each attribute names a mechanism some site asks about: a field nothing reads is dead (and a site comparing
    names instead would leave one unread)."""
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "attention.py")
    # and what the definition's own methods read of it (``self.x``; its docstrings name attributes too)
    sources += "\n".join(line for line in (PACKAGE / "attention.py").read_text().splitlines() if "self." in line)
    names = [f.name for f in dataclasses.fields(AttentionKernel)] + ["note", "runs_on"]
    unread = [n for n in names if not re.search(rf"\.{n}\b", sources)]
    assert not unread, unread


def test_no_site_compares_an_attention_name():
    """The planning path and the runtime ask the definition (``cfg.attention``), not ``cfg.attn == "..."``
    (the measurements importers parse free text and may; transformers' own implementation names may be compared)."""
    pattern = re.compile(r"\battn *(==|!=|in) *[\"']|[\"'](eager|sdpa|flash)[\"'] *(==|!=|in) *\w*attn\b")
    hits = [f"{p.relative_to(PACKAGE)}:{i}" for p in PACKAGE.rglob("*.py") if "measurements" not in p.parts
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line) and "hf_name" not in line and "attn_implementation" not in line]
    # runtime/build.py's _from_config compares the transformers implementation string attn_impl returned
    assert [h for h in hits if not h.startswith("runtime/build.py")] == [], hits


@pytest.fixture
def twins(monkeypatch):
    """Register, beside each kernel, a twin under another name with the same attributes (not the default): a new
    kernel defined only in vramplan.attention. Returns ``{twin name: original name}``."""
    made = {}
    for k in list(KERNELS.values()):
        twin = dataclasses.replace(k, name=f"{k.name}_twin", default=False)
        monkeypatch.setitem(KERNELS, twin.name, twin)
        made[twin.name] = k.name
    return made


#: (model, method, settings, card): every site's branch -- eager's saved scores, step work and the reference's scores
#: (DPO), SDPA's padding and sliding-window masks, flash's window, the models and stacks planned as eager (Falcon's
#: math-only SDPA, BLOOM's own attention, Gemma-2's refused SDPA, torchtune's soft-capped scores by hand), GRPO's
#: rollout work (a sliding window; fp32 SDPA with grouped heads), checkpointing
CASES = [
    ("llama-3.2-1b", "lora", dict(batch=2, seq=1024), "a100-80gb"),
    ("llama-3.2-1b", "lora", dict(batch=2, seq=1024, grad_ckpt=True, techniques=("padding",)), "a100-80gb"),
    ("llama-3.2-1b", "dpo", dict(batch=1, seq=1024), "a100-80gb"),
    ("mistral-7b-v0.1", "qlora", dict(batch=1, seq=8192), "a100-80gb"),
    ("gemma-2-2b", "lora", dict(batch=1, seq=8192), "a100-80gb"),
    ("gemma-2-2b", "lora", dict(batch=1, seq=2048, framework="torchtune"), "a100-80gb"),
    ("falcon-7b", "lora", dict(batch=1, seq=2048), "a100-80gb"),
    ("bloomz-7b1", "lora", dict(batch=1, seq=2048), "a100-80gb"),
    ("gemma-3-1b", "grpo", dict(batch=2, seq=2048), "a100-80gb"),
    ("llama-3.2-1b", "grpo", dict(batch=2, seq=1024, precision="fp32"), "a100-80gb"),
]


def _figures(est, rename: dict) -> tuple:
    text = [a for a in est.assumptions]
    for new, old in rename.items():
        text = [re.sub(rf"\b{new}\b", old, a) for a in text]
    return (est.peak_bytes, est.tensor_peak_bytes, est.components, est.phases, est.step_time_s, est.fits, text)


@pytest.mark.parametrize("model,method,settings,card", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_a_kernel_defined_only_by_its_attributes_is_planned_as_its_twin(twins, model, method, settings, card):
    """A new implementation with eager's (sdpa's, flash's) attributes and another name is planned to the byte as
    eager (sdpa, flash): memory, phases, step time, the attention notes; and the three kernels differ somewhere in
    these cases (so the twins' equality says something)."""
    spec, gpu = get_model(model), get_gpu(card)
    seen = {}
    for twin, name in twins.items():
        cfg = make_config(spec, method, attn=name, **settings)
        mine = _figures(estimate_config(spec, cfg.with_(attn=twin), gpu), {twin: name})
        assert mine == _figures(estimate_config(spec, cfg, gpu), {}), (twin, name)
        # the terms under the peak too (a site whose term is not the peak in these cases still shows)
        for fn in (step_terms, step_work):
            ours, theirs = fn(spec, cfg.with_(attn=twin)), fn(spec, cfg)
            for f in dataclasses.fields(theirs):
                assert np.array_equal(getattr(ours, f.name), getattr(theirs, f.name)), (fn.__name__, f.name, twin)
        if method == "grpo":
            T, s = np.array([512.0, 4096.0, 16384.0]), np.array([256.0, 2048.0, 8192.0])  # past the window
            assert np.array_equal(nograd_layer_work(spec, cfg.with_(attn=twin), T, s),
                                  nograd_layer_work(spec, cfg, T, s))
        seen[name] = mine[:5]
    assert len({repr(v) for v in seen.values()}) > 1 or model in ("bloomz-7b1",), seen


def test_card_support_and_the_hint_come_from_the_definition(twins):
    t4 = get_gpu("t4")
    for twin, name in twins.items():
        want = got = None
        try:
            check_card("fp16-mixed", "lora", None, name, t4)
        except VramplanError as e:
            want = (str(e), e.hint) if hasattr(e, "hint") else str(e)
        try:
            check_card("fp16-mixed", "lora", None, twin, t4)
        except VramplanError as e:
            got = (str(e), e.hint) if hasattr(e, "hint") else str(e)
        assert got == want, (twin, got, want)
        assert (want is not None) == attention_kernel(name).needs_card_support


def test_the_search_keys_ranks_and_tells_apart_by_attributes(twins):
    from vramplan.distributed import SINGLE
    from vramplan.planner.search import _preference_of, _shared_key

    cfg = make_config(get_model("llama-3.2-1b"), "lora", batch=2)
    for twin, name in twins.items():
        k = attention_kernel(name)
        assert _shared_key(cfg.with_(attn=twin), True)[1] == (k.same_as or twin)
        assert _shared_key(cfg.with_(attn=twin), False)[1] == twin  # where it does not tie: its own
        assert _preference_of(cfg.with_(attn=twin), None, SINGLE)[3] is True  # a twin is never the default
        assert _preference_of(cfg.with_(attn=name), None, SINGLE)[3] is (not k.default)
        assert cfg.with_(attn=twin).attention.note.replace(twin, name) == k.note
    assert attention_kernel("flash").note == "flash: same kernels as sdpa, needs flash-attn"
    assert attention_kernel("eager").note == "eager attention"


def test_the_runtime_builds_and_emulates_a_kernel_by_its_attributes(twins):
    torch = pytest.importorskip("torch")
    from vramplan.runtime.build import attn_impl
    from vramplan.runtime.emulation import CudaEmulation

    llama, gemma2 = get_model("llama-3.2-1b"), get_model("gemma-2-2b")
    q = torch.zeros(1, 4, 8, 64, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    mask = torch.ones(8, 8, dtype=torch.bool)
    for twin, name in twins.items():
        for spec in (llama, gemma2):
            for device, fake in (("cuda", True), ("cpu", False)):
                cfg = make_config(spec, "lora", attn=name)
                notes, twin_notes = [], []
                assert (attn_impl(cfg.with_(attn=twin), device, fake, twin_notes, spec)
                        == attn_impl(cfg, device, fake, notes, spec)), (twin, spec.name, device)
                assert twin_notes == notes
        emu, emu_twin = CudaEmulation(name), CudaEmulation(twin)
        for m, gqa in ((None, False), (mask, False), (None, True)):
            k = kv if gqa else q
            assert (emu_twin.choose_backend(q, k, k, m, True, False)
                    == emu.choose_backend(q, k, k, m, True, False)), (twin, m is not None, gqa)
    assert attn_impl(make_config(llama, "lora", attn="flash"), "cuda", True, [], llama) == "sdpa"
    assert CudaEmulation("flash").choose_backend(q, q, q, mask, True, False) == "flash"
    assert CudaEmulation("sdpa").choose_backend(q, q, q, mask, True, False) == "efficient"


def test_a_stack_that_always_runs_sdpa_refuses_a_kernel_that_materialises_scores(twins):
    pytest.importorskip("torch")
    from vramplan.runtime.stacks import get_runtime

    spec = get_model("llama-3.2-1b")
    for twin, name in twins.items():
        for attn in (name, twin):
            cfg = make_config(spec, "lora", framework="torchtune", attn=name).with_(attn=attn)
            try:
                get_runtime("torchtune").check(spec, cfg)
                refused = None
            except VramplanError as e:
                refused = str(e)
            said = refused is not None and "always runs SDPA" in refused
            assert said == attention_kernel(name).materialises_scores, (attn, refused)


def test_a_fake_build_emulates_the_kernel_it_is_given(twins):
    """The dry run's build hands its CUDA emulation the kernel's fp32 cast (flash_attention_2's target dtype) by
    attribute: a twin of flash gets flash's, a twin of sdpa none."""
    pytest.importorskip("transformers")
    from tests.conftest import TINY_LLAMA
    from vramplan.models import from_hf_config
    from vramplan.runtime.build import build

    spec = from_hf_config(dict(TINY_LLAMA), name="tiny-llama")
    for twin, name in twins.items():
        cfg = make_config(spec, "lora", attn=name)
        ours, theirs = (build(spec, c, "cuda", fake=True).emulation for c in (cfg.with_(attn=twin), cfg))
        assert (ours.flash_dtype, ours.kernel.name) == (theirs.flash_dtype, twin)
        assert (theirs.flash_dtype is not None) == attention_kernel(name).casts_fp32_inputs


# -- when flash-attn ties SDPA (memory.ties_stand_in) ---------------------------------------------

from vramplan.memory import ties_stand_in  # noqa: E402
from vramplan.models import catalogue  # noqa: E402

_TIE_SETTINGS = [
    ("lora", dict()), ("qlora", dict()), ("full", dict(grad_ckpt=True)), ("dpo", dict()),
    ("grpo", dict()), ("grpo", dict(adapter="qlora")), ("lora", dict(precision="fp32")),
    ("lora", dict(techniques="padding")), ("lora", dict(framework="torchtune")),
]


def _tie_cases():
    for name in sorted(catalogue()):
        for method, extra in _TIE_SETTINGS:
            for seq in (512, 6144):
                yield name, method, extra, seq


def test_flash_ties_sdpa_only_where_every_term_and_the_work_are_equal():
    """Wherever ``ties_stand_in`` says flash-attn is planned as SDPA (the search then evaluates them once), every
    step term, the step's work and GRPO's no-grad layer work are equal to the byte, over every catalogue model,
    methods, precisions, techniques, stacks and sequences past the sliding windows; and it says so for most of
    them (else the shortcut would be no shortcut: 887 of 1,224 when written)."""
    ties = apart = 0
    for name, method, extra, seq in _tie_cases():
        spec = get_model(name)
        try:
            cfg = make_config(spec, method, attn="flash", batch=2, seq=seq, **extra)
        except VramplanError:
            continue
        twin = cfg.with_(attn="sdpa")
        if not ties_stand_in(spec, cfg):
            apart += 1
            continue
        ties += 1
        for fn in (step_terms, step_work):
            ours, theirs = fn(spec, cfg), fn(spec, twin)
            for f in dataclasses.fields(theirs):
                assert np.array_equal(getattr(ours, f.name), getattr(theirs, f.name)), (name, method, extra, seq,
                                                                                        fn.__name__, f.name)
        if cfg.recipe.behaviour.generates:
            T, s = np.array([512.0, 4096.0 * 2]), np.array([256.0, float(seq)])
            assert np.array_equal(nograd_layer_work(spec, cfg, T, s), nograd_layer_work(spec, twin, T, s)), name
    assert ties > 2 * apart > 0, (ties, apart)  # apart: padding, windows past 6144 tokens, fp32 GRPO, Falcon


@pytest.mark.parametrize("model,settings", [
    ("llama-2-7b", dict(techniques="padding")),               # SDPA gets the padding mask; flash-attn unpads
    ("mistral-7b-v0.1", dict(seq=8192)),                       # a sliding window shorter than the sequence
    ("gemma-2-2b", dict(seq=8192)),
    ("falcon-7b", dict()),                                     # SDPA's math backend only (planned as eager)
    ("llama-3.2-1b", dict(method="grpo", precision="fp32")),   # fp32 SDPA over grouped kv heads: the composite
])
def test_flash_and_sdpa_are_kept_apart_where_sdpa_builds_more(model, settings):
    """Where SDPA gets a mask or a composite that flash-attn does not, they are not keyed as one, and their step
    terms do differ (so keying them apart is not just caution)."""
    spec = get_model(model)
    settings = {"method": "lora", "seq": 2048, **settings}
    cfg = make_config(spec, settings.pop("method"), attn="flash", batch=2, **settings)
    assert not ties_stand_in(spec, cfg)
    ours, theirs = step_terms(spec, cfg), step_terms(spec, cfg.with_(attn="sdpa"))
    differs = any(not np.array_equal(getattr(ours, f.name), getattr(theirs, f.name)) for f in dataclasses.fields(ours))
    if cfg.recipe.behaviour.generates:
        T, s = np.array([4096.0]), np.array([2048.0])
        differs = differs or not np.array_equal(nograd_layer_work(spec, cfg, T, s),
                                                nograd_layer_work(spec, cfg.with_(attn="sdpa"), T, s))
    assert differs


def test_sdpa_and_eager_never_tie_anything():
    spec = get_model("llama-2-7b")
    for attn in ("sdpa", "eager"):
        assert not ties_stand_in(spec, make_config(spec, "lora", attn=attn))


def test_the_search_plans_flash_apart_where_it_does_not_tie_sdpa():
    """A padded batch gives SDPA a mask flash-attn does not build: the search's flash plans carry flash's own
    figures (estimate_config's), less than SDPA's, and its micro-batch is at least as large; with packed batches
    the two tie. (Before ties_stand_in the search gave flash SDPA's figures whatever the batch.)"""
    from vramplan.planner.search import search

    spec, card = get_model("llama-3.2-1b"), get_gpu("h100-sxm")
    for techniques, apart in (("padding", True), ((), False)):
        mp = search(spec, "lora", card, seq=4096, techniques=techniques, rank=8, targets="q_proj,v_proj",
                    optimizer="adamw", grad_ckpt=False)
        by_attn = {p.config.attn: p for p in mp.plans if p.fallback is None}
        for attn, p in by_attn.items():
            assert p.peak_bytes == estimate_config(spec, p.config, card).peak_bytes, attn
        flash, sdpa = by_attn["flash"], by_attn["sdpa"]
        flash_at_sdpa_batch = estimate_config(spec, flash.config.with_(batch=sdpa.config.batch), card).peak_bytes
        if apart:
            assert flash_at_sdpa_batch < sdpa.peak_bytes and flash.config.batch >= sdpa.config.batch
        else:
            assert (flash.peak_bytes, flash.config.batch) == (sdpa.peak_bytes, sdpa.config.batch)


def test_the_search_tries_what_the_card_runs_from_the_definitions(twins):
    """The kernels a search tries come from the definitions: never one that materialises its scores, one that needs
    card support only on a card that has it -- a twin defined only in attention.py is tried as its original."""
    from vramplan.attention import searched_kernels

    assert searched_kernels(get_gpu("a100-80gb"))[:2] == ["sdpa", "flash"]
    assert searched_kernels(get_gpu("t4"))[:1] == ["sdpa"] and "flash" not in searched_kernels(get_gpu("t4"))
    for twin, name in twins.items():
        for card in ("a100-80gb", "t4"):
            assert (twin in searched_kernels(get_gpu(card))) == (name in searched_kernels(get_gpu(card)))
