"""The shortcuts that make ``vramplan fit`` fast give the answers of the long way, and the fit path stays light.

Speed itself is measured by ``benchmarks/cli_speed.py`` (no wall-clock assertion here); these tests
pin what the shortcuts must preserve and count what they must skip:

* ``search._setup_best`` (other stacks/precisions judged on the search's arrays, one plan built) lists
  what the full search would list (``search._best_of`` of it), and nothing exactly when it would list nothing;
* ``memory.step_memory_rows_shared`` with a kept terms cache, and ``throughput.step_time_rows``,
  equal the per-configuration functions;
* ``results.json_text`` is ``json.dumps(indent=2, allow_nan=False)`` to the byte;
* ``verdict.classify`` on plain numbers equals ``classify_array``;
* ``stacks.installed_version`` equals ``importlib.metadata.version``;
* ``TrainConfig``'s kept hash equals the hash of a fresh equal config (and of the fields), is not carried
  by ``with_`` or a pickle, and ``with_`` drops exactly the resolved values the changed fields feed;
* ``activations._layer_setup``'s reuse of its last layer equals a fresh one for interleaved configurations,
  and ``memory.step_terms`` (one layer computed once per copy) equals the terms built the long way;
* the ``fit --json`` path imports neither torch, rich nor ``importlib.metadata``;
* ``phases.combine_phases`` asked for a set of components (what the device chain reads:
  ``planner.estimating.DEVICE_CHAIN_READS``) gives each as the whole breakdown has it, and the device totals
  of such a step memory equal the whole one's; ``phases._at_peak`` skipping phases not given equals the long way;
* ``ModelSpec.params``/``layer_params``/``linear_params``, ``adapters.adapter_tensors``,
  ``OptimizerDef.total_state_bytes``, ``overheads._kept_figures`` and ``methods.grpo.settings``, kept by what
  they read, equal the values worked out anew; ``optimizers.get_optimizer`` finds names as written as re-spelled;
* ``search._candidates`` (one make_config per (recipe, rank, targets), the other settings set on it) lists what
  make_config of every ``_combos`` combination lists, and ``_setup_best``'s ``_listing_filter`` (shut candidates
  never built) lists what the search lists; ``TrainConfig.with_`` (what to drop kept per tuple of change names)
  equals ``dataclasses.replace``;
* ``StepTime.at``/``json_at`` equal broadcasting and indexing every field; ``step_time_rows`` sharing what the
  optimiser's seconds do not enter equals ``step_time`` field by field; ``distributed.overlap`` without
  communication equals its formula bit for bit; ``DeviceTotals.rows`` equals each row's chain alone;
  ``profiles.find_profile`` finds what the Path way finds; ``recommend_techniques`` batching each greedy round
  advises what one estimate at a time does.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from conftest import check_setup_best_as_search

import vramplan
from vramplan.gpus import get_gpu
from vramplan.memory import step_memory_rows, step_memory_rows_shared
from vramplan.models import get_model
from vramplan.planner import search as search_mod
from vramplan.planner.checks import check_card
from vramplan.planner.limits import DeviceTotals
from vramplan.planner.search import MICRO_BATCHES, search
from vramplan.request import SearchRequest
from vramplan.results import json_text
from vramplan.stacks import installed_version, stacks
from vramplan.throughput import step_time, step_time_rows
from vramplan.verdict import VERDICTS, classify, classify_array


@pytest.mark.parametrize("model,gpu", [("llama-2-13b", "rtx4000ada"), ("llama-3.2-1b", "t4")])
@pytest.mark.parametrize("method", ["lora", "ppo", "grpo", "kto", "full"])
def test_setup_best_equals_the_search(model, gpu, method):
    spec, card = get_model(model), get_gpu(gpu)
    checked, listed = check_setup_best_as_search(spec, method, card, (
        dict(seq=2048), dict(seq=512, global_batch=16), dict(seq=1024, grad_ckpt=True, rank=16)))
    assert checked
    if method in ("lora", "kto"):  # these fit somewhere: the winner's plan itself is compared
        assert listed


def test_other_setups_answers_as_the_search_and_searches_less(monkeypatch):
    """The same suggestions as searching every setup; on the benchmark case (13b on an RTX 4000 Ada) no setup
    needs a search (the arrays settle it), where the long way runs one per setup that can be listed."""
    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    calls: list = []
    real = search_mod.search
    monkeypatch.setattr(search_mod, "search", lambda *a, **k: calls.append(a) or real(*a, **k))

    def run() -> tuple[list, int]:
        calls.clear()
        out = []
        for method in ("ppo", "grpo", "dpo", "kto", "full"):
            prec = check_card(None, method, None, "sdpa", card, "hf")
            for current in (None, "fits"):
                mp = real(spec, method, card, framework="hf", precision=prec, seq=2048)
                shown = mp.best or mp.smallest if current else None
                out.append([x.to_json() for x in search_mod.other_setups(
                    spec, method, card, framework="hf", precision=prec, current=shown, seq=2048,
                    totals=DeviceTotals())])
        return out, len(calls)

    fast, fast_calls = run()
    monkeypatch.setattr(search_mod, "_setup_best",
                        lambda spec, method, card, current_fits, req: search_mod._best_of(
                            search_mod.search(spec, method, card, req), current_fits))
    slow, slow_calls = run()
    assert fast == slow
    assert any(fast)
    assert fast_calls == 0 < slow_calls


def test_shared_rows_and_step_time_rows_equal_one_config_at_a_time():
    spec, card = get_model("7b"), get_gpu("rtx4090")
    base = vramplan.make_config(spec, "lora", seq=1024)
    cfgs = [base.with_(grad_ckpt=g, optimizer=o) for g in (False, True) for o in ("adamw", "adamw_8bit",
                                                                                  "paged_adamw_8bit")]
    b = MICRO_BATCHES[:8]
    a = np.ones_like(b)
    want, _ = step_memory_rows(spec, cfgs, batch=b, grad_accum=a)
    kept: dict = {}
    for _ in range(2):  # the second call reads every configuration's terms from the cache
        got, _ = step_memory_rows_shared(spec, cfgs, batch=b, grad_accum=a, terms=kept)
        assert np.array_equal(got.peak, want.peak)
        for c, v in want.components.items():
            assert np.array_equal(got.components[c], v)
    assert len(kept) == 2  # one per configuration but its optimiser
    for cfg, t in zip(cfgs, step_time_rows(spec, cfgs, card, batch=b, grad_accum=a)):
        one = step_time(spec, cfg, card, batch=b, grad_accum=a)
        assert np.array_equal(t.tokens_per_s, one.tokens_per_s) and np.array_equal(t.step_s, one.step_s)
        assert t.at(3).to_json() == one.at(3).to_json()


def _tree(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth > 4 or r < 0.4:
        return rng.choice([rng.randint(-10 ** 20, 10 ** 20), rng.random() * 10 ** rng.randint(-30, 30), "s\t\u1234é\"",
                           None, True, False, 0, -0.0, np.float64(1.5)])
    if r < 0.7:
        return [_tree(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "b", "é", str(r)]): _tree(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_json_text_is_json_dumps_to_the_byte():
    rng = random.Random(11)
    for _ in range(500):
        t = _tree(rng)
        assert json_text(t) == json.dumps(t, indent=2, allow_nan=False)
    for t in ({}, [], {"a": {}}, [[]], (1, 2), {1: 2, 2.5: 3, True: 4, None: 5}, "x"):
        assert json_text(t) == json.dumps(t, indent=2, allow_nan=False)
    for bad in (float("nan"), [float("inf")], {"a": float("-inf")}, [1, float("nan")], {"a": {"b": float("nan")}}):
        with pytest.raises(ValueError, match="Out of range"):
            json_text(bad)
    with pytest.raises(TypeError):
        json_text({"a": object()})
    with pytest.raises(TypeError):
        json_text({(1, 2): 1})


def test_classify_plain_numbers_equals_classify_array():
    rng = random.Random(5)
    for _ in range(20000):
        cap = rng.choice([rng.randint(1, 2 ** 40), float(rng.randint(1, 2 ** 40))])
        peak = rng.choice([rng.randint(0, 2 ** 41), rng.random() * 2 ** 41, int(cap * 0.85), int(cap * 0.85) + 1, cap])
        hi = rng.choice([0.0, rng.random(), -rng.random(), 0.25])
        lo = rng.choice([0.0, -rng.random(), rng.random(), -0.99, -1.5])
        assert classify(peak, cap, hi, lo) is VERDICTS[int(classify_array(peak, cap, hi, lo))]


@pytest.mark.parametrize("package", ["numpy", "pytest", "NumPy", "no-such-package-vramplan"])
def test_installed_version_is_importlib_metadata(package):
    installed_version.cache_clear()
    try:
        want = metadata.version(package)
    except metadata.PackageNotFoundError:
        want = None
    assert installed_version(package) == want


def test_fit_json_path_stays_light():
    code = ("import sys, io, contextlib\n"
            "from vramplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = main(['fit', '--model', '1b', '--gpu', 'rtx3080', '--methods', 'lora,ppo', '--json'])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'peft', 'rich', 'importlib.metadata')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["0", "[]"]


def _fresh(cfg):
    """An equal configuration built from its fields (nothing resolved or kept)."""
    import dataclasses

    return type(cfg)(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def test_kept_hash_equals_a_fresh_configs_and_is_not_carried():
    import dataclasses
    import pickle

    from vramplan.config import _RESOLVED_FROM, make_config

    spec = get_model("llama-2-7b")
    cfg = make_config(spec, "qlora", rank=16)
    fields = tuple(getattr(cfg, f.name) for f in dataclasses.fields(cfg))
    assert hash(cfg) == hash(_fresh(cfg)) == hash(fields) == hash(cfg)
    [getattr(cfg, name) for name in _RESOLVED_FROM]  # resolve and keep them (recipe, stack, regime, attention)
    for changes in ({"rank": 32}, {"grad_ckpt": True, "attn": "eager"}, {"framework": "torchtune"},
                    {"method": "lora", "adapter": "lora"}, {"precision": "fp32"}, {"optimizer": "adamw_8bit"}):
        new = cfg.with_(**changes)
        assert "_hash" not in new.__dict__
        assert hash(new) == hash(_fresh(new)) and new == _fresh(new)
        for name, read in _RESOLVED_FROM.items():  # a resolved value survives only when its fields are unchanged
            assert (name in new.__dict__) == set(changes).isdisjoint(read)
            assert getattr(new, name) == getattr(_fresh(new), name)
    back = pickle.loads(pickle.dumps(cfg))
    assert "_hash" not in back.__dict__ and back == cfg and hash(back) == hash(cfg)
    assert {cfg, _fresh(cfg), back, cfg.with_(rank=16)} == {cfg}


def test_layer_setup_reuse_and_step_terms_equal_the_long_way():
    import dataclasses

    from vramplan import activations as act
    from vramplan import memory
    from vramplan.config import make_config
    from vramplan.methods import Forward

    spec = get_model("llama-2-7b")
    # variants of one config share its resolved recipe (copies) and regime objects: only the config differs
    bases = [make_config(spec, m) for m in ("lora", "qlora", "dora", "full", "dpo", "ppo")]
    for base in bases:
        base.recipe, base.stack, base.regime  # noqa: B018 - resolved once, carried by with_
    cfgs = [base.with_(grad_ckpt=gc, attn=attn, dropout=dropout) for base in bases
            for gc in (False, True) for attn in ("sdpa", "eager") for dropout in (0.0, 0.1)]
    assert cfgs[0].regime is cfgs[1].regime and cfgs[0].recipe is cfgs[1].recipe
    T, s = np.array([2048.0, 8192.0]), np.array([2048.0, 2048.0])
    for cfg in cfgs:
        for copy in cfg.recipe.copies:
            assert act._layer_setup(spec, cfg, copy, cfg.regime) == act._new_layer(spec, cfg, copy, cfg.regime)
    for cfg in cfgs + cfgs[::-1]:
        for copy in cfg.recipe.copies:
            long = act._new_layer(spec, cfg, copy, cfg.regime)
            assert act._layer_setup(spec, cfg, copy, cfg.regime) == long
            for part in act.LAYER_PARTS:
                got = act.layer_activation_bytes(spec, cfg, copy, cfg.regime, T, s, part=part)
                act._LAST_SETUP = None
                assert np.array_equal(got, act.layer_activation_bytes(spec, cfg, copy, cfg.regime, T, s, part=part))
        batch = np.array([1.0, 2.0, 8.0])
        t = memory.step_terms(spec, cfg, batch=batch)
        # the long way: each copy's stack and layer terms compute their layer on their own
        run = memory.attention_as_run(spec, cfg)
        built = run.stack.as_built(spec)
        for copy in run.recipe.copies:
            if copy.forward is Forward.NO_GRAD:
                continue
            rows = batch * run.recipe.sequences_per_example
            Tb, sb = rows * run.seq, np.asarray(float(run.seq))
            zeros = np.zeros(np.broadcast(batch, sb).shape)
            assert all(np.array_equal(a, b) for a, b in zip(
                memory._stack_activations(built, run, copy, run.regime, Tb, sb),
                memory._stack_activations(built, run, copy, run.regime, Tb, sb,
                                          act.layer_activation_bytes(built, run, copy, run.regime, Tb, sb))))
            one = memory._layer_terms(built, run, copy, Tb, sb, zeros)
            two = memory._layer_terms(built, run, copy, Tb, sb, zeros,
                                      act.layer_activation_bytes(built, run, copy, run.regime, Tb, sb))
            assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
        again = memory.step_terms(spec, _fresh(cfg), batch=batch)
        assert all(np.array_equal(getattr(t, f.name), getattr(again, f.name)) for f in dataclasses.fields(t))


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "dpo", "ppo", "grpo"])
def test_estimate_peaks_rows_equal_estimate_peaks(method):
    from vramplan.config import make_config
    from vramplan.errors import VramplanError
    from vramplan.overheads import card_profile
    from vramplan.planner.estimating import estimate_peaks, estimate_peaks_rows
    from vramplan.planner.techniques import technique_names

    spec, card = get_model("llama-2-7b"), get_gpu("rtx4090")
    base = make_config(spec, method, batch=2, seq=1024)
    cfgs = [base]
    for name in technique_names():
        try:
            cfgs.append(base.with_techniques((name,)))
        except VramplanError:
            continue
    cfgs += [c.with_(optimizer="paged_adamw_8bit") for c in cfgs[:2]]
    assert len(cfgs) > 3
    one_by_one = [estimate_peaks(spec, c, card) for c in cfgs]
    assert estimate_peaks_rows(spec, cfgs, card) == one_by_one
    # the card's profile looked up once by the caller (None: it has none) gives what each call looks up
    prof = card_profile(card)
    assert estimate_peaks_rows(spec, cfgs, card, prof) == one_by_one
    assert [estimate_peaks(spec, c, card, profile=prof) for c in cfgs] == one_by_one
    with pytest.raises(ValueError):
        estimate_peaks_rows(spec, [base, base.with_(batch=4)], card)


@pytest.mark.parametrize("model,gpu,method", [("13b", "rtx4000ada", "lora"), ("13b", "rtx4000ada", "full"),
                                              ("7b", "rtx4090", "dpo"), ("7b", "rtx3080", "ppo")])
def test_recommend_techniques_answers_as_one_estimate_at_a_time(monkeypatch, model, gpu, method):
    _one_estimate_at_a_time(monkeypatch, model, gpu, method)


def _one_estimate_at_a_time(monkeypatch, model, gpu, method) -> int:
    """recommend_techniques' advice equals the advice with every estimate made alone; the calls of the batched
    estimates (``techniques._estimate_many``) left out."""
    from vramplan.config import make_config
    from vramplan.planner import techniques as tech

    spec = get_model(model)
    cfg = make_config(spec, method)
    fast = tech.recommend_techniques(spec, cfg, gpu).to_json()
    calls = []
    with monkeypatch.context() as mp:
        mp.setattr(tech, "_estimate_many", lambda *a: calls.append(a))  # singles and each greedy round
        assert tech.recommend_techniques(spec, cfg, gpu).to_json() == fast
    assert calls  # the shortcut was the one left out
    return len(calls)


def test_recommend_techniques_rounds_answer_as_one_estimate_at_a_time(monkeypatch):
    """A greedy choice of several rounds (full fine-tuning of a 13B model on a 20 GiB card: each round's sets worked
    out at once, ``techniques._estimate_many``) recommends what one estimate at a time does."""
    assert _one_estimate_at_a_time(monkeypatch, "13b", "rtx4000ada", "full") >= 2  # the singles and a greedy round


def test_kept_floors_equal_fresh_ones():
    """``DeviceTotals.floor`` kept per instance (keyed on the spec's and card's identity) equals a fresh
    instance's, for the same and for equal-but-distinct specs and cards (a card with less memory too)."""
    import dataclasses

    from vramplan.config import make_config

    spec, card = get_model("llama-2-13b"), get_gpu("rtx4000ada")
    kept = DeviceTotals()
    cfgs = [make_config(spec, m, framework=fw, optimizer=o) for m in ("lora", "qlora", "full", "dpo")
            for fw in ("hf", "torchtune") for o in ("adamw", "paged_adamw_8bit")]
    small = dataclasses.replace(card, memory_bytes=card.memory_bytes // 2)
    for sp, cd in ((spec, card), (spec, card), (dataclasses.replace(spec), card), (spec, small), (spec, small)):
        for cfg in cfgs:  # the second round of each pair reads the kept floors
            for any_opt in (False, True):
                assert kept.floor(sp, cfg, cd, any_optimizer=any_opt) == \
                    DeviceTotals().floor(sp, cfg, cd, any_optimizer=any_opt)
    assert len(kept._floors) == 2 * len(cfgs) * 3  # one per (spec, card) object pair kept alive beside it


@pytest.mark.parametrize("model,gpu,method", [("13b", "rtx4000ada", "dpo"), ("13b", "rtx4000ada", "full"),
                                              ("13b", "rtx4000ada", "ppo"), ("llama-3.2-1b", "t4", "grpo"),
                                              ("7b", "rtx3080", "lora")])
def test_fastest_plan_is_the_searchs(model, gpu, method):
    """``search.fastest_plan`` (one plan built from the arrays when one is comfortable) is the plan the search's
    ranking gives: its best, else its fastest within the card, with the same rank and reason."""
    spec, card = get_model(model), get_gpu(gpu)
    seen = set()
    for techniques in ((), ("chunked_ce",), ("chunked_ce", "act_offload")):
        for seq in (512, 2048, 8192):
            kw = dict(seq=seq, techniques=techniques, totals=DeviceTotals())
            try:
                mp = search(spec, method, card, **kw)
            except vramplan.VramplanError:
                continue
            fitting = [p for p in mp.plans if p.peak_bytes <= p.capacity_bytes]
            want = mp.best or (max(fitting, key=lambda p: p.tokens_per_s) if fitting else None)
            got = search_mod.fastest_plan(spec, method, card, SearchRequest.build(**kw))
            assert (got is None) == (want is None)
            if want is not None:
                assert got.to_json() == want.to_json() and got.summary() == want.summary()
            seen.add("none" if want is None else want.verdict.value)
    assert seen  # every case ran


@pytest.mark.parametrize("model,gpu", [("llama-2-13b", "rtx4000ada"), ("llama-3.2-1b", "t4")])
def test_listing_filter_first_bound_is_below_each_optimisers_floor(model, gpu):
    """``search._listing_filter`` skips a candidate on the every-optimiser floor before its own: that floor is at or
    below the floor of each optimiser (else it would skip a candidate its own floor keeps)."""
    from vramplan.config import make_config

    spec, card = get_model(model), get_gpu(gpu)
    totals = DeviceTotals()
    checked = 0
    for fw in stacks():
        for method in ("lora", "qlora", "full", "dpo", "ppo", "grpo"):
            try:
                base = make_config(spec, method, framework=fw, precision=check_card(None, method, None, "sdpa", card, fw))
            except vramplan.VramplanError:
                continue
            loose = totals.floor(spec, base.with_(optimizer="adamw"), card, any_optimizer=True)
            for opt in search_mod.OPTIMIZERS:
                own = totals.floor(spec, base.with_(optimizer=opt), card)
                assert (loose is None) == (own is None)
                if own is not None:
                    assert loose <= own, (fw, method, opt)
                    checked += 1
    assert checked


def test_model_spec_kept_hash_is_the_dataclass_hash():
    """``ModelSpec``'s kept hash equals the hash of its hashed fields (the frozen dataclass's), is not carried by
    ``dataclasses.replace``, a copy or a pickle, and a spec with list fields stays unhashable."""
    import copy
    import dataclasses
    import pickle

    for name in ("llama-2-13b", "llama-3.2-1b", "7b"):
        spec = get_model(name)
        fields = tuple(getattr(spec, f.name) for f in dataclasses.fields(spec) if f.hash is None and f.compare or f.hash)
        assert hash(spec) == hash(fields) == hash(spec)
        assert "_hash" in spec.__dict__
        for other in (dataclasses.replace(spec), copy.copy(spec), pickle.loads(pickle.dumps(spec))):
            assert "_hash" not in other.__dict__ and other == spec and hash(other) == hash(spec)
    listy = dataclasses.replace(get_model("7b"), lora_targets=["q_proj", "v_proj"])
    for _ in range(2):
        with pytest.raises(TypeError):
            hash(listy)


@pytest.mark.parametrize("method,strategy", [("lora", None), ("full", None), ("ppo", None), ("qlora", "zero3"),
                                             ("full", "fsdp")])
def test_combine_phases_subset_equals_the_whole_breakdown(monkeypatch, method, strategy):
    """``combine_phases(components=<set>)`` (the search's device totals read only the activation group and the
    optimiser states) gives each asked-for component exactly as the whole breakdown has it, in its order, with
    the same phases and peak: one device and sharded layouts (gathered and reduce buffers), every single
    component, the device chain's set and random subsets."""
    import vramplan.distributed as dist
    import vramplan.memory as mem_mod
    from vramplan.overheads import ACTIVATION_COMPONENTS
    from vramplan.phases import combine_phases
    from vramplan.taxonomy import Component

    calls = []

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return combine_phases(*args, **kwargs)
    monkeypatch.setattr(dist, "combine_phases", spy)
    monkeypatch.setattr(mem_mod, "combine_phases", spy)
    spec = get_model("7b")
    cfg = vramplan.make_config(spec, method, seq=1024, grad_ckpt=method == "full", attn="eager")
    b = MICRO_BATCHES[:6]
    if strategy is None:
        mem_mod.step_memory(spec, cfg, batch=b, grad_accum=np.where(b > 2, 2, 1))
    else:
        dist.parallel_step_memory(spec, cfg, dist.make_parallel(4, strategy), batch=b)
    assert calls
    rng = random.Random(11)
    comps = list(Component)
    subsets = [frozenset([c]) for c in comps] + [frozenset(ACTIVATION_COMPONENTS) | {Component.OPTIMIZER_STATES}]
    subsets += [frozenset(rng.sample(comps, rng.randint(0, len(comps)))) for _ in range(6)]
    for args, kwargs in calls:
        kwargs = dict(kwargs)
        kwargs.pop("components", None)
        args = args[:4]  # the components flag (positional in the sharded call) is set below
        phases, peak, idx, whole = combine_phases(*args, **kwargs)
        assert combine_phases(*args, **kwargs, components=False)[3] == {}
        for want in subsets:
            p2, peak2, idx2, part = combine_phases(*args, **kwargs, components=want)
            assert list(part) == [c for c in whole if c in want]
            for c, v in part.items():
                assert np.array_equal(v, whole[c]), c
            assert np.array_equal(peak2, peak) and np.array_equal(idx2, idx)
            assert all(np.array_equal(p2[p], phases[p]) for p in phases)


@pytest.mark.parametrize("model,gpu,method", [("llama-2-13b", "rtx4000ada", "lora"), ("7b", "rtx4090", "ppo"),
                                              ("7b", "a100-40gb", "full"), ("llama-3.2-1b", "t4", "grpo")])
def test_device_totals_of_the_read_components_equal_the_whole_step_memorys(model, gpu, method):
    """The band curves and what_would_fit work out only :data:`limits.DEVICE_CHAIN_READS` at the peak: the device
    chain (``DeviceTotals``, ``step_device_total``) gives the same totals as from the whole step memory, over a
    batch grid and a sequence grid, for a paged and a plain optimiser; the subset is the whole's components."""
    from vramplan.memory import step_memory
    from vramplan.overheads import step_device_total
    from vramplan.planner.limits import DEVICE_CHAIN_READS, device_totals

    spec, card = get_model(model), get_gpu(gpu)
    totals = DeviceTotals()
    grids = [dict(batch=np.arange(1, 65)), dict(batch=1, seq=np.arange(128, 4097, 128))]
    for opt in ("adamw", "paged_adamw_8bit"):
        cfg = vramplan.make_config(spec, method, seq=512, optimizer=opt)
        for grid in grids:
            whole = step_memory(spec, cfg, **grid)
            part = step_memory(spec, cfg, **grid, components=DEVICE_CHAIN_READS)
            assert set(part.components) == DEVICE_CHAIN_READS & set(whole.components)
            for c, v in part.components.items():
                assert np.array_equal(v, whole.components[c])
            assert np.array_equal(totals(part, cfg, card), totals(whole, cfg, card))
            assert np.array_equal(step_device_total(part, cfg, card), step_device_total(whole, cfg, card))
            assert np.array_equal(device_totals(spec, cfg, card, totals=totals, **grid), totals(whole, cfg, card))


def test_at_peak_skipping_phases_not_given_equals_the_long_way():
    """``phases._at_peak`` skips the phases a component has no value for: equal (values and dtype) to one
    ``np.where`` per phase with zeros for those not given, for scalars, ints, floats and columns."""
    from vramplan.phases import PHASE_ORDER, _at_peak

    rng = np.random.default_rng(5)
    for trial in range(40):
        shape = [(7,), (3, 7), (1,)][trial % 3]
        zeros = np.zeros(shape)
        idx = rng.integers(0, len(PHASE_ORDER), size=shape)
        given = [p for p in PHASE_ORDER if rng.random() < 0.5]
        by_phase = {}
        for p in given:
            kind = rng.integers(0, 3)
            by_phase[p] = (int(rng.integers(0, 10 ** 12)) if kind == 0 else
                           rng.integers(0, 10 ** 12, size=shape) if kind == 1 else rng.random(shape) * 1e9)
        long = zeros.copy()
        for k, p in enumerate(PHASE_ORDER):
            long = np.where(idx == k, by_phase.get(p, zeros), long)
        got = _at_peak(idx, zeros, by_phase)
        assert got.dtype == long.dtype and np.array_equal(got, long)


def _long_config_of(spec, m, ad, common, settings, built):
    cfg = search_mod.make_config(spec, m, adapter=ad, batch=1, **common, **settings)
    search_mod._resolve_once(cfg)
    return cfg


@pytest.mark.parametrize("model", ["llama-2-13b", "llama-3.2-1b", "qwen1.5-moe-a2.7b"])
def test_candidates_at_another_rank_equal_make_configs(monkeypatch, model):
    """``search._config_of`` (a (recipe, targets) already built at another rank: that config with its rank and alpha
    set, the rank checked) gives the candidates make_config gives, field for field and in order, for every method
    and stack, each once (``_candidates`` drops a repeat by its base's fields and the three settings, not by hashing
    each candidate); a rank the user fixes too large for a layer is refused either way."""
    from vramplan.planner.fitting import default_methods

    spec, card = get_model(model), get_gpu("a100-80gb")
    compared, saved, made = 0, 0, []
    real = search_mod.make_config
    monkeypatch.setattr(search_mod, "make_config", lambda *a, **k: made.append(1) or real(*a, **k))
    for method in default_methods():
        for fw in stacks():
            for fixed in ({}, {"targets": "all-linear"}, {"rank": 16, "grad_ckpt": True}):
                made.clear()
                try:
                    req = SearchRequest.build(seq=1024, framework=fw, precision=check_card(None, method, None, "sdpa",
                                                                                             card, fw), **fixed)
                    got = search_mod._candidates(spec, method, card, req)
                except vramplan.VramplanError:
                    got = None
                fast = len(made)
                with monkeypatch.context() as mp:
                    mp.setattr(search_mod, "_config_of", _long_config_of)
                    try:
                        want = search_mod._candidates(spec, method, card, req)
                    except vramplan.VramplanError:
                        want = None
                if want is None or got is None:
                    assert want is got, (method, fw, fixed)
                    continue
                assert [(c.to_dict(), n) for c, n in got] == [(c.to_dict(), n) for c, n in want], (method, fw, fixed)
                assert [c for c, _ in got] == [c for c, _ in want]
                assert len(set(c for c, _ in got)) == len(got)  # distinct (equal ones dropped: all-linear = default)
                assert fast <= len(made) - fast  # the long way's calls
                saved += len(made) - 2 * fast
                compared += len(got)
    assert compared > 1000 and saved > 100
    with pytest.raises(vramplan.VramplanError, match="rank 65536 is larger"):
        search_mod._candidates(spec, "lora", card, SearchRequest.build(seq=1024, rank=65536))


def test_other_setups_judge_grpo_on_the_card_its_search_has(monkeypatch):
    """GRPO with vLLM colocated: fit's search plans the step on the card less vLLM's share, and the other stacks and
    precisions it lists are judged on that same card (the whole card would list setups whose step leaves vLLM no
    room: 16.8 GiB of a 20 GiB card whose step has 14 GiB)."""
    opts = {"generation": "vllm-colocate", "vllm_gpu_memory_utilization": 0.3}
    whole = get_gpu("rtx4000ada")
    step_card = int(whole.memory_bytes * 0.7)
    seen = []
    real = search_mod.other_setups
    monkeypatch.setattr(search_mod, "other_setups",
                        lambda spec, m, card, *a, **k: seen.append((m, card.memory_bytes)) or real(spec, m, card, *a, **k))
    # 8B: vLLM's 4-bit weights load in its 30% (13B's do not: then nothing is listed, tests/test_step_share.py)
    row = vramplan.fit("8b", "rtx4000ada", methods=["grpo"], method_options=opts).rows[0]
    assert row.best is None and seen == [("grpo", step_card)]
    assert row.alternatives and all(a.detail["peak_bytes"] <= step_card for a in row.alternatives)
    on_whole = real(get_model("8b"), "grpo", whole, current=row.chosen, method_options=opts)
    assert any(a.detail["peak_bytes"] > step_card for a in on_whole)  # what the whole card would have listed




#: One field of a configuration changed at a time (the layer sums must tell every such pair apart, or share them).
_VARIANTS = {"rank": [8, 16, 64], "targets": [None, "all-linear", "q_proj,v_proj"], "dropout": [0.0, 0.1],
             "grad_ckpt": [False, True], "attn": ["sdpa", "flash", "eager"], "seq": [512, 2048, 5000, 8192],
             "framework": ["hf", "torchtune", "unsloth", "litgpt", "fsdp_qlora"], "precision": [None, "bf16", "fp32"],
             "techniques": [(), ("padding",), ("chunked_ce",), ("selective_ckpt",)],
             "versions": [None, "bitsandbytes=0.42.0", "peft=0.11.0", "transformers=5.20.0"],
             "method": ["lora", "qlora", "dora", "dpo", "orpo", "grpo", "ppo", "kto"]}


def _sums_configs(rng: random.Random, n: int):
    """(model, configuration) pairs: ``n`` drawn at random, each with every variant of :data:`_VARIANTS` (one field
    changed) that make_config takes."""
    models = ["llama-2-13b", "gemma-2-2b", "mistral-7b-v0.1", "phi-2", "falcon-7b", "gpt-neox-20b", "qwen3-30b-a3b",
              "olmo-2-7b", "bloomz-7b1", "gemma-3-1b"]
    out = []
    fixed = [("llama-2-13b", dict(method="qlora")), ("mistral-7b-v0.1", dict(method="dpo", attn="sdpa", seq=8192))]
    while len(out) < n:
        spec = get_model(fixed[0][0] if fixed else rng.choice(models))
        kw = dict({k: rng.choice(v) for k, v in _VARIANTS.items()}, framework="hf", versions=None,
                  **fixed.pop(0)[1]) if fixed else {k: rng.choice(v) for k, v in _VARIANTS.items()}
        try:
            vramplan.make_config(spec, **kw)
        except vramplan.VramplanError:
            continue
        for k, values in _VARIANTS.items():
            for v in values:
                try:
                    out.append((spec, vramplan.make_config(spec, **dict(kw, **{k: v}))))
                except vramplan.VramplanError:
                    pass
    return out


def test_kept_layer_sums_equal_fresh_ones():
    """``activations._layer_sums`` kept by what they read: with the sums of hundreds of other configurations kept (the
    same method's at other checkpointing, other methods' over the same policy, other stacks, versions, techniques),
    every part of every copy's layer and every term of ``step_terms`` equals the one computed with nothing kept, to
    the byte and dtype."""
    from vramplan import activations as act
    from vramplan import memory

    pairs = _sums_configs(random.Random(11), 600)
    grid = MICRO_BATCHES[:9]

    def everything(spec, cfg):
        built = cfg.stack.as_built(spec)
        out = []
        for copy in cfg.recipe.copies:
            for part in act.LAYER_PARTS:
                for irg in (True, False):
                    out.append(act.layer_activation_bytes(built, cfg, copy, cfg.regime, 3.0 * grid, cfg.seq,
                                                          input_requires_grad=irg, part=part))
        for batch in (grid, None):
            t = memory.step_terms(spec, cfg, batch)
            out += [getattr(t, f.name) for f in memory.fields(memory.StepTerms)]
        return out

    fresh = []
    for spec, cfg in pairs:
        act._SUMS.clear()
        fresh.append(everything(spec, cfg))
    act._SUMS.clear()
    for spec, cfg in random.Random(12).sample(pairs, len(pairs)):
        everything(spec, cfg)  # keep every configuration's sums
    assert len(act._SUMS) > 300
    for (spec, cfg), want in zip(reversed(pairs), reversed(fresh)):
        got = everything(spec, cfg)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert np.asarray(g).dtype == np.asarray(w).dtype and np.array_equal(g, w), (spec.name, cfg)


@pytest.mark.parametrize("gpu", ["rtx4000ada", "rtx4090", "a100-80gb"])
@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "grpo", "full"])
def test_step_time_rows_sharing_the_micro_step_equal_step_time(method, gpu):
    """``step_time_rows`` computes the micro-step's seconds once per configuration but its optimiser when the card
    has no calibration profile (``throughput._default_micro``): every row equals ``step_time`` of its config --
    its arrays, its parts and its JSON -- for every optimiser, checkpointing and technique; what the optimiser's seconds
    do not enter (``throughput._optimizer_free``) is shared by those configurations too."""
    import dataclasses

    from vramplan.throughput import _profile

    spec, card = get_model("llama-2-13b"), get_gpu(gpu)
    base = vramplan.make_config(spec, method, seq=1024)
    cfgs = [base.with_(grad_ckpt=g, optimizer=o, techniques=t) for g in (False, True)
            for o in ("adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor") for t in ((), ("chunked_ce",))]
    b = MICRO_BATCHES[:10]
    a = np.where(b > 4, 1, 2)
    for cfg, t in zip(cfgs, step_time_rows(spec, cfgs, card, batch=b, grad_accum=a)):
        one = step_time(spec, cfg, card, batch=b, grad_accum=a)
        for f in dataclasses.fields(t):  # every field: values, types and dtypes (one GPU: the optimiser-free part shared)
            got, want = getattr(t, f.name), getattr(one, f.name)
            if f.name == "parts":
                assert list(got) == list(want), cfg
                got, want = list(got.values()), list(want.values())
            assert type(got) is type(want) and np.shape(got) == np.shape(want), (cfg, f.name)
            assert np.array_equal(got, want) and np.asarray(got).dtype == np.asarray(want).dtype, (cfg, f.name)
        assert t.at(2).to_json() == one.at(2).to_json() and t.source == one.source
    assert _profile(card) is None or gpu != "rtx4000ada"


def test_step_terms_stack_equals_np_stack():
    """``StepTerms.stack`` (``np.array`` of rows of one shape) equals ``np.stack`` of each term, values and dtype,
    for rows of several methods over a micro-batch grid and at one shape."""
    from vramplan import memory

    spec = get_model("llama-2-13b")
    for batch in (MICRO_BATCHES[:7], None):
        rows = []
        for method in ("lora", "qlora", "dpo", "grpo", "full", "ppo"):
            t = memory.step_terms(spec, vramplan.make_config(spec, method, seq=1024), batch)
            rows.append(t.broadcast(t.zeros.shape))
        got = memory.StepTerms.stack(rows)
        for f in memory.fields(memory.StepTerms):
            want = np.stack([getattr(r, f.name) for r in rows])
            have = getattr(got, f.name)
            assert have.dtype == want.dtype and have.shape == want.shape and np.array_equal(have, want), f.name


def test_filled_is_broadcast_to_as_a_new_array():
    """``phases.filled`` gives ``np.broadcast_to``'s values, dtype and shape (a new array), and refuses what it refuses."""
    from vramplan.phases import filled

    for v in (0, 3, 2.5, np.float64(1.5), np.int64(7), np.arange(4.0), np.arange(4), np.ones((1, 4)), True):
        for shape in ((4,), (3, 4), (2, 3, 4)):
            try:
                want = np.broadcast_to(v, shape)
            except ValueError:
                with pytest.raises(ValueError):
                    filled(v, shape)
                continue
            got = filled(v, shape)
            assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    for v, shape in ((np.arange(3.0), (4,)), (np.ones((3, 4)), (4,))):
        with pytest.raises(ValueError):
            np.broadcast_to(v, shape)
        with pytest.raises(ValueError):
            filled(v, shape)


def test_kept_copy_dtypes_equal_fresh_ones():
    """``activations.copy_dtypes`` kept by its arguments equals the dtypes computed anew, for every copy of every
    method under every stack's regimes, with and without the k-bit upcast."""
    from vramplan import activations as act

    seen = 0
    for spec, cfg in _sums_configs(random.Random(5), 200):
        for copy in cfg.recipe.copies:
            for kbit in (True, False):
                assert act.copy_dtypes(copy, cfg.regime, kbit) == act._new_dtypes(copy, cfg.regime, kbit)
                seen += 1
    assert seen > 200 and len(act._DTYPES) > 10


@pytest.mark.parametrize("names", [("grad_ckpt", "attn"), ("optimizer",), ("optimizer", "attn")])
def test_fields_but_equal_exactly_when_the_configs_set_alike_are(names):
    """``config.fields_but`` (the keys of ``search._candidates``' repeats, the activation terms and step work, and
    ``search._shared_key``) is equal for two configurations exactly when they are equal once ``names`` are set
    alike, over a search's candidates and configurations varied field by field."""
    from vramplan.config import fields_but

    alike = {"grad_ckpt": False, "attn": "sdpa", "optimizer": "adamw"}
    changed = {"grad_ckpt": lambda c: not c.grad_ckpt, "attn": lambda c: "eager", "optimizer": lambda c: "adafactor"}

    cfgs = [c for _, c in _sums_configs(random.Random(3), 150)]
    spec, card = get_model("llama-2-13b"), get_gpu("rtx4000ada")
    cfgs += [c for c, _ in search_mod._candidates(spec, "dpo", card, SearchRequest.build(seq=1024))]
    rng = random.Random(4)
    pairs = [(a, b) for a in cfgs for b in rng.sample(cfgs, 20)] + [(a, a.with_(**{n: changed[n](a) for n in names}))
                                                                     for a in cfgs]
    same = 0
    set_alike = {n: alike[n] for n in names}
    for a, b in pairs:
        want = a.with_(**set_alike) == b.with_(**set_alike)
        assert (fields_but(a, *names) == fields_but(b, *names)) == want
        same += want
    assert same >= len(cfgs)


def _catalogue_specs():
    from vramplan.models import catalogue

    return list(catalogue().values())


def test_kept_parameter_counts_equal_fresh_ones():
    """``ModelSpec.params`` / ``layer_params`` (kept per spec) equal the counts worked out anew, for every catalogue
    model and cut-down depths of it; a spec with list fields (unhashable, as built from a log's JSON) is counted
    each time and gets the same figures."""
    import dataclasses

    specs = _catalogue_specs()
    specs += [s.with_layers(n) for s in specs[:20] for n in (1, 3)]
    for spec in specs:
        assert spec.params == spec._params() and spec.layer_params == spec._layer_params(), spec.name
        assert spec.linear_params == spec._linear_params() == \
            spec.num_layers * sum(l.params for l in spec._build_layer_linears()), spec.name
        want = (spec.embedding_params + spec.lm_head_params + spec.final_norm_params
                + spec.num_layers * (sum(l.params for l in spec._build_layer_linears()) + spec.layer_norm_params()))
        assert spec.params == want, spec.name
    spec = get_model("llama-2-13b")
    listed = dataclasses.replace(spec, aliases=list(spec.aliases) or ["x"])
    with pytest.raises(TypeError):
        hash(listed)
    assert listed.params == spec.params and listed.layer_params == spec.layer_params
    assert listed.linear_params == spec.linear_params
    wider = dataclasses.replace(spec, hidden_size=spec.hidden_size + 128)
    assert wider.params == wider._params() != spec.params


def test_kept_adapter_tensors_equal_fresh_ones():
    """``adapters.adapter_tensors`` (kept per model, adapter, rank and targets) equals the tensors worked out anew
    for every adapter, several ranks and each model's target sets; each caller gets its own list."""
    from vramplan import adapters
    from vramplan.methods import Adapter

    seen = 0
    for spec in [get_model(m) for m in ("llama-2-13b", "gemma-2-2b", "phi-2", "qwen3-30b-a3b", "falcon-7b")]:
        names = tuple(l.name for l in spec.layer_linears() if l.is_linear)
        for adapter in Adapter:
            for rank in (1, 8, 64):
                for targets in (spec.lora_targets, spec.ia3_targets, names):
                    if adapter.ia3 and not set(targets) <= set(names):
                        continue
                    for _ in range(2):  # computed, then kept
                        got = adapters.adapter_tensors(spec, adapter, rank, targets)
                        assert got == adapters._adapter_tensors(spec, adapter, rank, targets)
                        got.append(None)  # the caller's own list
                    seen += 1
    assert seen > 100
    spec = get_model("llama-2-13b")
    assert adapters.adapter_tensors(spec, Adapter.LORA, 8, list(spec.lora_targets)) == \
        adapters._adapter_tensors(spec, Adapter.LORA, 8, spec.lora_targets)  # unhashable targets: worked out


def test_kept_optimizer_totals_equal_fresh_ones():
    """``OptimizerDef.total_state_bytes`` (kept per definition and groups) equals the sum worked out anew for every
    optimiser over the groups of many configurations; another definition of the same name gets its own total."""
    import dataclasses

    from vramplan.memory import _state_without_optimizer
    from vramplan.optimizers import OPTIMIZERS

    groups = []
    for spec, cfg in _sums_configs(random.Random(6), 60):
        groups.append(_state_without_optimizer(spec, cfg)[1])
    for opt in OPTIMIZERS.values():
        for g in groups:
            for _ in range(2):
                assert opt.total_state_bytes(g) == opt._total_state_bytes(tuple(g)) == \
                    sum(c * opt.state_bytes(s, b) for s, c, b in g)
            assert opt.total_state_bytes(iter(g)) == opt._total_state_bytes(tuple(g))
    adamw = OPTIMIZERS["adamw"]
    g = groups[0]
    other = dataclasses.replace(adamw, states=adamw.states + 1)
    assert adamw.total_state_bytes(g) != other.total_state_bytes(g) == other._total_state_bytes(tuple(g))
    listed = [(list(s), c, b) for s, c, b in g]  # unhashable shapes: summed each time
    assert adamw.total_state_bytes(listed) == adamw.total_state_bytes(g)


def test_kept_overhead_figures_equal_fresh_ones():
    """``overheads._kept_figures`` (kept per card, profile, method and stack) equals ``_figures`` worked out anew, for
    catalogue cards without a profile and with a calibrated one, recipes and stacks; another card or profile
    object gets its own figures."""
    import dataclasses

    from vramplan import overheads
    from vramplan.gpus import catalogue
    from vramplan.methods import method_names
    from vramplan.profiles import AllocatorModel, Fitted, Profile

    card = get_gpu("a100-80gb")
    prof = Profile(gpu="a100-80gb", device={"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB"}, versions={},
                   created="t", source="x.jsonl", source_info={}, allocated_source="torch.cuda",
                   context=Fitted(700 << 20, 3), workspace=Fitted(24 << 20, 2),
                   allocator=AllocatorModel(1.2, 0, n=5), activation_factors={"lora": Fitted(1.5, 4)})
    cases = [(c, None) for c in list(catalogue().values())[:12]] + [(None, None), (card, prof), (None, prof)]
    names = method_names()[:10] + ["dpo+qlora", None]
    seen = 0
    for gpu, p in cases:
        for method in names:
            for stack in (None, "hf", "torchtune"):
                for _ in range(2):  # worked out, then kept
                    assert overheads._kept_figures(gpu, p, method, stack) == overheads._figures(gpu, p, method, stack)
                seen += 1
    assert seen > 300
    kept = overheads._kept_figures(card, prof, "lora", "hf")
    assert kept.factor == 1.5 and overheads._kept_figures(card, prof, "lora", "hf") is kept
    other = dataclasses.replace(prof, activation_factors={"lora": Fitted(2.0, 4)})
    assert overheads._kept_figures(card, other, "lora", "hf") == overheads._figures(card, other, "lora", "hf")
    assert overheads._kept_figures(card, other, "lora", "hf").factor == 2.0
    wider = dataclasses.replace(card, compute_capability="9.0")
    assert overheads._kept_figures(wider, None, "lora", "hf").workspace == overheads._figures(wider, None, "lora", "hf").workspace \
        != overheads._kept_figures(card, None, "lora", "hf").workspace


def test_kept_grpo_settings_equal_fresh_ones():
    """``methods.grpo.settings`` (kept per configuration and ``seq``) equals the settings worked out anew over GRPO
    configurations varied in batch, accumulation, sequence and options, and still refuses what it refuses."""
    from vramplan.methods import grpo

    spec = get_model("llama-2-13b")
    seen = 0
    for seq in (512, 1024, 4096):
        for batch in (1, 2, 3, 8):
            for accum in (1, 4, 6):
                for opts in ({}, dict(num_generations=4), dict(generation="vllm-colocate"), dict(completion=100)):
                    try:
                        cfg = vramplan.make_config(spec, "grpo", seq=seq, batch=batch, grad_accum=accum, **opts)
                    except vramplan.VramplanError:
                        continue
                    for s in (None, 300, seq):
                        try:
                            want = grpo._settings(cfg, s)
                        except vramplan.VramplanError:
                            with pytest.raises(vramplan.VramplanError):
                                grpo.settings(cfg, s)
                            continue
                        assert grpo.settings(cfg, s) == want == grpo.settings(cfg, s)
                        seen += 1
    assert seen > 100


def test_optimizer_names_as_written_resolve_as_respelled():
    """``get_optimizer`` finds a catalogue name as written without re-spelling it: every spelling (as written,
    upper case, dashes) resolves to what ``OPTIMIZERS[name.lower().replace("-", "_")]`` holds, a definition
    to itself, and an unknown name is refused."""
    from vramplan.optimizers import OPTIMIZERS, get_optimizer

    for name, opt in OPTIMIZERS.items():
        for spelled in (name, name.upper(), name.replace("_", "-"), name.title()):
            assert get_optimizer(spelled) is OPTIMIZERS[spelled.lower().replace("-", "_")] is opt
        assert get_optimizer(opt) is opt
    with pytest.raises(vramplan.VramplanError):
        get_optimizer("adamw9")


def _long_candidates(spec, method, card, req, fixed=None):
    """``search._candidates`` the long way: make_config of every combination of ``search._combos``, equal ones dropped."""
    from vramplan.optimizers import get_optimizer

    fixed = req.fixed if fixed is None else fixed
    common = req.pick("seq", "precision", "ppo_response", "framework", "techniques", "method_options")
    out, seen = [], set()
    for m, ad, note, settings, _ in search_mod._combos(spec, method, req.adapter, card, fixed, [None]):
        try:
            cfg = search_mod.make_config(spec, m, adapter=ad, batch=1, **common, **settings)
        except vramplan.VramplanError:
            if fixed.get("rank") or fixed.get("targets"):
                raise
            continue
        cfg = cfg.with_(grad_ckpt=bool(cfg.grad_ckpt), optimizer=get_optimizer(cfg.optimizer).name)
        if cfg not in seen:
            seen.add(cfg)
            out.append((cfg, note))
    return out


@pytest.mark.parametrize("model", ["llama-2-13b", "llama-3.2-1b", "qwen1.5-moe-a2.7b"])
def test_candidates_equal_every_combination_made_anew(model):
    """``search._candidates`` (one make_config per (recipe, rank, targets), the other settings set on it, repeats
    dropped by number) lists the configurations of every ``_combos`` combination made by make_config, equal ones
    dropped, field for field and in order -- every method and stack, fixed settings or not, an optimiser the catalogue
    spells otherwise; a setting make_config refuses is refused (or skipped) alike."""
    from vramplan.planner.fitting import default_methods

    spec = get_model(model)
    compared = 0
    for card in (get_gpu("a100-80gb"), get_gpu("v100-32gb")):  # flash attention or not
        for method in default_methods():
            for fw in stacks():
                for fixed in ({}, {"targets": "all-linear"}, {"rank": 16, "grad_ckpt": True}, {"optimizer": "AdamW_8bit"},
                              {"attn": "eager", "grad_ckpt": False}, {"optimizer": "no-such-optimizer"}, {"rank": 10 ** 6}):
                    try:
                        req = SearchRequest.build(seq=1024, framework=fw, **fixed,
                                                  precision=check_card(None, method, None, "sdpa", card, fw))
                    except vramplan.VramplanError:
                        continue
                    outcome = []
                    for way in (search_mod._candidates, _long_candidates):
                        try:
                            outcome.append(way(spec, method, card, req))
                        except vramplan.VramplanError as e:
                            outcome.append(str(e))
                    got, want = outcome
                    if isinstance(want, str) or isinstance(got, str):
                        assert got == want, (method, fw, fixed)
                        continue
                    assert [(c.to_dict(), n) for c, n in got] == [(c.to_dict(), n) for c, n in want], (method, fw, fixed)
                    assert [c for c, _ in got] == [c for c, _ in want]
                    compared += len(got)
    assert compared > 5000


def test_with_equals_replace_in_any_order_of_its_changes():
    """``TrainConfig.with_`` (what to drop kept per tuple of change names) equals a config built anew with those
    fields (``dataclasses.replace``) whatever the order of the changes, drops the kept hash and exactly the resolved
    values the changed fields feed; method options, ``versions`` and ``options`` go through ``replace``."""
    import dataclasses
    import itertools

    from vramplan.config import _RESOLVED_FROM, make_config

    spec = get_model("llama-2-7b")
    for base in (make_config(spec, "qlora", rank=16), make_config(spec, "grpo", seq=1024, method_options={"num_generations": 4})):
        hash(base)  # kept, to be dropped
        [getattr(base, name) for name in _RESOLVED_FROM]  # resolved (recipe, stack, regime, attention): dropped or carried
        for changes in ({"rank": 32, "grad_ckpt": True, "attn": "eager"}, {"optimizer": "adamw_8bit", "batch": 4},
                        {"framework": "torchtune", "grad_ckpt": True}, {"precision": "fp32", "rank": 8},
                        {"method": "lora", "adapter": "lora", "batch": 2}):
            for order in itertools.permutations(changes):
                new = base.with_(**{k: changes[k] for k in order})
                want = dataclasses.replace(base, **changes)
                assert new == want and new.to_dict() == want.to_dict() and hash(new) == hash(_fresh(want))
                for name, read in _RESOLVED_FROM.items():
                    assert (name in new.__dict__) == set(changes).isdisjoint(read)
                    assert getattr(new, name) == getattr(want, name)
    opt = base.with_(num_generations=6, batch=2)  # the grpo config: a method option
    assert dict(opt.options)["num_generations"] == 6 and opt.batch == 2 and "recipe" not in opt.__dict__
    assert opt.with_(num_generations=None) == dataclasses.replace(opt, options=tuple(
        (k, v) for k, v in opt.options if k != "num_generations"))


def _long_at(t, index=()):
    """``StepTime.at`` the long way: every field as a float64 array broadcast to the grid, then indexed."""
    import dataclasses

    shape = np.shape(t.step_s)

    def pick(v):
        a = np.asarray(v, dtype=np.float64)
        return float(a) if a.ndim == 0 else float(np.broadcast_to(a, shape)[index])

    floats = {f.name: pick(getattr(t, f.name)) for f in dataclasses.fields(t)
              if f.name not in ("grad_accum", "calibrated", "source", "parts")}
    return type(t)(**floats, grad_accum=int(round(pick(t.grad_accum))), calibrated=t.calibrated, source=t.source,
                   parts={k: pick(v) for k, v in t.parts.items()})


def test_step_time_at_equals_broadcast_and_index():
    """``StepTime.at`` (a float64 array of the grid's shape indexed directly, a float taken as it is) equals every field
    broadcast to the grid as float64 and indexed, value and type, for grids over batch and accumulation, a 2-D grid,
    and a scalar step time; several GPUs (a scalar communication time) too. ``StepTime.json_at`` is the JSON of
    ``at``, and a plan's JSON holds its time's."""
    import dataclasses

    from vramplan.distributed import make_parallel

    spec, card = get_model("7b"), get_gpu("rtx4090")
    checked = 0
    for method in ("lora", "qlora", "full", "grpo"):
        cfg = vramplan.make_config(spec, method, seq=1024)
        b = MICRO_BATCHES[:12]
        cases = [(step_time(spec, cfg, card, batch=b, grad_accum=np.maximum(1, 32 // b)), list(range(len(b)))),
                 (step_time(spec, cfg, card, batch=b[:, None], seq=np.array([512, 1024])), [(i, j) for i in (0, 5)
                                                                                           for j in (0, 1)]),
                 (step_time(spec, cfg, card), [()]),
                 (step_time(spec, cfg, card, batch=b, parallel=make_parallel(2, "ddp")), [0, 7])]
        for t, indices in cases:
            for i in indices:
                got, want = t.at(i), _long_at(t, i)
                for f in dataclasses.fields(got):
                    g, w = getattr(got, f.name), getattr(want, f.name)
                    assert type(g) is type(w) and g == w, (method, f.name, i)
                assert json.dumps(t.json_at(i)) == json.dumps(got.to_json())  # the JSON at i, without the StepTime
                checked += 1
    assert checked > 50
    spec, card = get_model("7b"), get_gpu("rtx4000ada")
    plans = search(spec, "grpo", card, seq=1024, global_batch=16).plans + search(spec, "lora", card, seq=1024).plans
    for p in plans:  # a plan's JSON holds its time's
        assert json.dumps(p.to_json()["throughput"]) == json.dumps(p.time.to_json())


def test_find_profile_equals_the_path_way(tmp_path):
    """``profiles.find_profile`` (os.path, a Path built for the file found only) finds what ``Path(d) / name`` and
    ``is_file`` find, in order, for str and Path directories, a directory named like the file, a missing one, and a
    profile written after an earlier look-up found none."""
    from pathlib import Path

    from vramplan.profiles import find_profile, profile_key

    def long_way(gpu, dirs):
        for d in dirs:
            p = Path(d) / f"{profile_key(gpu)}.json"
            if p.is_file():
                return p
        return None

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b):
        d.mkdir()
    (a / f"{profile_key('h100-sxm')}.json").mkdir()  # a directory, not a profile
    (b / f"{profile_key('h100-sxm')}.json").write_text("{}")
    (a / f"{profile_key('rtx4090')}.json").write_text("{}")
    for dirs in ([a, b], [str(a), str(b) + "/"], [c, b, a], [str(c)], [], [Path(".."), b]):
        for gpu in ("h100-sxm", "rtx4090", "a100-80gb"):
            got, want = find_profile(gpu, dirs), long_way(gpu, dirs)
            assert got == want and type(got) is type(want), (dirs, gpu)
    assert find_profile("a100-80gb", [a, b]) is None
    (b / f"{profile_key('a100-80gb')}.json").write_text("{}")  # written mid-process: found at once
    assert find_profile("a100-80gb", [a, b]) == b / f"{profile_key('a100-80gb')}.json"


def test_overlap_without_communication_equals_the_formula():
    """``distributed.overlap`` with no communication (a float 0.0, one GPU: the compute itself when every entry is
    positive) equals ``max(c, m) + (1 - share) * min(c, m)`` bit for bit -- zeros, negative zeros, NaN and
    negative entries, 0-d and 2-d arrays, and other shares included."""
    from vramplan.distributed import OVERLAP, overlap

    rng = np.random.default_rng(7)
    cases = [rng.random(44) * 10, rng.random((5, 3)) + 1e-300, np.array([1.0, 0.0, 2.0]), np.array([1.0, -0.0]),
             np.array([np.nan, 1.0]), np.array([-1.0, 3.0]), np.array(2.5), np.arange(1, 45, dtype=np.int64),
             np.array([np.inf, 1.0])]
    for c in cases:
        for m in (0.0, 0, np.float64(0.0), 1e-3):
            for share in (OVERLAP, 0.0, 1.0, 1.5):
                cc = np.asarray(c, dtype=np.float64)
                mm = np.asarray(m, dtype=np.float64)
                want = np.maximum(cc, mm) + (1.0 - share) * np.minimum(cc, mm)
                got = overlap(c, m, share)
                assert type(got) is type(want) and np.shape(got) == np.shape(want)
                assert np.array_equal(got, want, equal_nan=True)
                assert np.array_equal(np.signbit(got), np.signbit(want))
                assert got is not c


@pytest.mark.parametrize("gpu", ["rtx4090", "a100-80gb"])
def test_device_totals_rows_equal_each_rows_chain(gpu):
    """``DeviceTotals.rows`` (optimisers' paging, states' loaded bytes and recipes' names worked out once per distinct
    one) equals the chain of each row alone (``DeviceTotals.__call__`` of its ``step_memory``), to the byte, for rows
    that repeat states and mix methods, adapters, optimisers and stacks."""
    from vramplan.memory import step_memory
    from vramplan.profiles import Fitted, Profile

    spec, card = get_model("7b"), get_gpu(gpu)
    cfgs = []
    for method, fw in (("lora", "hf"), ("qlora", "hf"), ("dpo", "hf"), ("lora", "torchtune"), ("full", "unsloth")):
        base = vramplan.make_config(spec, method, seq=1024, framework=fw)
        cfgs += [base.with_(optimizer=o, grad_ckpt=g) for o in ("adamw", "paged_adamw_8bit", "adamw_8bit")
                 for g in (False, True)]
    cfgs += cfgs[:4]  # repeated rows: the same configurations (and states) again
    b = MICRO_BATCHES[:10]
    a = np.where(b < 4, 2, 1)
    mem, states = step_memory_rows(spec, cfgs, batch=b, grad_accum=a)
    states = states[:-4] + states[:4]  # the repeated rows hold the very same state objects
    # no profile, and a profile whose activation factors differ by recipe (each recipe's chain its own)
    for prof in (None, Profile(gpu=gpu, device={"kind": "cuda", "name": gpu}, versions={}, created="t", source="t",
                               source_info={}, allocated_source="torch.cuda",
                               activation_factors={"lora": Fitted(1.25, 4), "qlora": Fitted(1.1, 4),
                                                   "dpo": Fitted(1.4, 4), "full": Fitted(1.05, 4)})):
        totals, alone = DeviceTotals(), DeviceTotals()
        if prof is not None:
            totals._profiles[card.name] = alone._profiles[card.name] = prof
        got = totals.rows(mem, states, cfgs, card)
        for j, cfg in enumerate(cfgs):
            want = alone(step_memory(spec, cfg, batch=b, grad_accum=a), cfg, card)
            assert np.array_equal(got[j], want), (j, cfg.method, cfg.optimizer, cfg.framework)
        assert prof is None or not np.array_equal(got[0], got[6])  # lora's and qlora's chains differ
