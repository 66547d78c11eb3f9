"""The shortcuts that make ``vramplan fit`` fast give the answers of the long way, and the fit path stays light.

Speed itself is measured by ``benchmarks/cli_speed.py`` (no wall-clock assertion here); these tests
pin what the shortcuts must preserve and count what they must skip:

* ``search._may_list`` (other stacks/precisions judged from their device totals) says "nothing to
  list" exactly when the full search would list nothing;
* ``memory.step_memory_rows_shared`` with a kept terms cache, and ``throughput.step_time_rows``,
  equal the per-configuration functions;
* ``results.json_text`` is ``json.dumps(indent=2, allow_nan=False)`` to the byte;
* ``verdict.classify`` on plain numbers equals ``classify_array``;
* ``stacks.installed_version`` equals ``importlib.metadata.version``;
* the ``fit --json`` path imports neither torch, rich nor ``importlib.metadata``.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

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


def _would_list(mp, current_fits: bool) -> bool:
    """other_setups' own test on a finished search: a best plan, or a tight one when the shown plan does not fit."""
    if mp.best is not None:
        return True
    return not current_fits and any(q.peak_bytes <= q.capacity_bytes for q in mp.plans)


@pytest.mark.parametrize("model,gpu", [("llama-2-13b", "rtx4000ada"), ("llama-3.2-1b", "t4")])
@pytest.mark.parametrize("method", ["lora", "ppo", "grpo", "kto"])
def test_may_list_agrees_with_the_search(model, gpu, method):
    spec, card = get_model(model), get_gpu(gpu)
    checked = 0
    for fw in stacks():
        try:
            prec = check_card(None, method, None, "sdpa", card, fw)
        except vramplan.VramplanError:
            continue
        kw = dict(framework=fw, precision=prec, seq=2048, totals=DeviceTotals())
        try:
            mp = search(spec, method, card, **kw)
        except vramplan.VramplanError:
            continue
        for current_fits in (False, True):
            assert search_mod._may_list(spec, method, card, current_fits, SearchRequest.build(**kw)) == \
                _would_list(mp, current_fits), (fw, current_fits)
        checked += 1
    assert checked


def test_other_setups_answers_as_without_the_shortcut_and_searches_less(monkeypatch):
    """The same suggestions as searching every setup; on the benchmark case (13b on an RTX 4000 Ada, whose
    PPO and GRPO fit on no other stack or precision) the device totals settle every setup without a search."""
    spec, card = get_model("13b"), get_gpu("rtx4000ada")
    calls: list = []
    real = search_mod.search
    monkeypatch.setattr(search_mod, "search", lambda *a, **k: calls.append(k.get("framework")) or real(*a, **k))

    def run() -> tuple[list, int]:
        calls.clear()
        out = []
        for method in ("ppo", "grpo"):
            prec = check_card(None, method, None, "sdpa", card, "hf")
            out.append([x.to_json() for x in search_mod.other_setups(
                spec, method, card, framework="hf", precision=prec, current=None, seq=2048, totals=DeviceTotals())])
        return out, len(calls)

    fast, fast_calls = run()
    monkeypatch.setattr(search_mod, "_may_list", lambda *a, **k: True)
    slow, slow_calls = run()
    assert fast == slow
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
    for bad in (float("nan"), [float("inf")], {"a": float("-inf")}):
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
