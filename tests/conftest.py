import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: a two-layer Llama-shaped config small enough to build and step on CPU; tests vary it with ``dict(TINY_LLAMA, ...)``
TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (not a package) so tests can run a reduced form of it."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def save_calibrated_a100(tmp_path, monkeypatch, allocator, activation_factors):
    """Save an a100-80gb calibration profile (context 450 MiB, workspace 16 MiB, ``allocator``, ``activation_factors``)
    in a profiles folder of ``tmp_path`` that is the only one searched; the card it calibrates."""
    from vramplan import profiles as profiles_mod
    from vramplan.gpus import get_gpu
    from vramplan.profiles import Fitted, Profile, Throughput

    d = tmp_path / "profiles"
    d.mkdir()
    monkeypatch.setenv("VRAMPLAN_PROFILES", str(d))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(profiles_mod, "REPO_DIR", tmp_path / "none")
    monkeypatch.setattr(profiles_mod, "PACKAGE_DIR", tmp_path / "none")
    mib = 1 << 20
    prof = Profile(gpu="a100-80gb", device={"kind": "cuda", "name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
                   versions={"driver": "580.159.04", "cuda": "13.0", "torch": "2.11.0+cu130"},
                   created="2026-11-23T00:00:00Z", source="a100-80gb.jsonl", source_info={},
                   allocated_source="torch.cuda",
                   throughput={"lora": Throughput((1e-4, 0.0, 1 / 200e12, 0.0), ((4096, 150.0),), 4)},
                   context=Fitted(450 * mib, 5), workspace=Fitted(16 * mib, 2),
                   allocator=allocator, activation_factors=activation_factors)
    prof.save(d / "a100-80gb.json")
    return get_gpu("a100-80gb")


def setups_of(spec, method, card):
    """(stack, precision) of every setup ``search.other_setups`` could try for ``method`` on ``card``: each stack at
    its own precision and in bf16, where the card runs it."""
    import vramplan
    from vramplan.planner.checks import check_card
    from vramplan.stacks import stacks

    for fw in stacks():
        for precision in (None, "bf16"):
            try:
                yield fw, check_card(precision, method, None, "sdpa", card, fw)
            except vramplan.VramplanError:
                continue


def listed_json(listed):
    """A listed (plan, verdict) as comparable data: the plan's JSON but its rank and reason (set by the
    search's ranking, never read by other_setups)."""
    if listed is None:
        return None
    plan, verdict = listed
    out = plan.to_json()
    out.pop("rank"), out.pop("reason")
    return out, plan.summary(), verdict


def check_setup_best_as_search(spec, method, card, settings) -> tuple[int, int]:
    """``search._setup_best`` lists what the whole search would (``_best_of``, with and without a fitting current
    plan) for every setup of :func:`setups_of` under each of ``settings`` (search keywords); ``(setups checked,
    plans listed)``."""
    import vramplan
    from vramplan.planner import search as search_mod
    from vramplan.planner.limits import DeviceTotals
    from vramplan.request import SearchRequest

    checked = listed = 0
    for fw, prec in setups_of(spec, method, card):
        for kw in settings:
            kw = dict(kw, framework=fw, precision=prec, totals=DeviceTotals())
            try:
                mp = search_mod.search(spec, method, card, **kw)
            except vramplan.VramplanError:
                continue
            for current_fits in (False, True):
                want = listed_json(search_mod._best_of(mp, current_fits))
                got = listed_json(search_mod._setup_best(spec, method, card, current_fits, SearchRequest.build(**kw)))
                assert got == want, (fw, prec, kw, current_fits)
                listed += want is not None
            checked += 1
    return checked, listed
