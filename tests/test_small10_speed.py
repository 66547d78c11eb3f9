"""Shortcuts of session 10's per-fit small costs (helper small10) give the answers of the long way.

Speed is measured by ``benchmarks/cli_speed.py``; these tests pin what each shortcut must preserve:

* ``methods.resolve`` keeps a recipe named by text per (method, adapter) text while the registry holds the method
  it came from: asked in a row, every method with every adapter (names, ``method+adapter`` names, any case) gets
  the recipe worked out anew; a method registered again under a name gets its own; refusals are raised each time;
* ``Recipe.name``, ``Recipe.behaviour`` and ``MethodDef.behaviour``, kept in the (frozen) object once read, equal
  the name spelt out and the behaviour loaded, for every recipe and for a recipe replaced by another adapter;
* ``stacks.effective_regime`` kept per (precision, framework) names equals the regime worked out anew for every
  pair, asked in a row, and is worked out anew when the name comes to mean another regime or stack;
* ``profiles.find_profile``'s kept candidate paths (per card name and search directories) and ``default_search``'s
  last directories: a profile written after a lookup found none is found, one removed is not, another
  ``VRAMPLAN_PROFILES``, working directory or package directory is searched, the paths equal the long way's, and
  a card name no profile can be named after is refused every time;
* ``cli._parser_for`` looking argparse's messages up once each while it builds gives every parser the messages
  argparse's own lookup gives (a translating lookup shows in every subcommand's help), and puts argparse's lookup
  back afterwards, also when the build fails;
* ``methods.Adapter``'s flags (plain attributes of each member, set once) are what each adapter is: PEFT but full
  training, an NF4 base for the q- adapters, low rank for the LoRA family, DoRA, IA³.
"""

from __future__ import annotations

import dataclasses

import pytest

from vramplan import methods
from vramplan.errors import VramplanError


def _asked_names():
    out = []
    for name, md in methods.registry().items():
        out += [(name, None), (name.upper(), None)]
        for ad in md.adapters:
            out += [(name, ad.value), (f"{name}+{ad.value}", None), (name, ad.value.upper())]
    return out


def test_kept_recipes_equal_recipes_worked_out_anew():
    asked = _asked_names()
    assert len(asked) > 40
    for _ in range(2):  # the second round reads kept recipes
        for method, adapter in asked:
            kept, fresh = methods.resolve(method, adapter), methods._resolve(method, adapter)
            assert kept == fresh and kept.name == fresh.name, (method, adapter)
            assert kept.method is methods.get_method(kept.method.name)


def test_a_method_registered_again_is_resolved_anew():
    entry = {"summary": "a toy method", "source": "tests/test_small10_speed.py", "behaviour": "sft",
             "adapters": ["lora", "full"], "sequences_per_example": 1, "rollout": False,
             "copies": [{"role": "policy", "trains": True, "head": "lm", "forward": "grad"}]}
    try:
        methods.register("small10-toy", entry)
        first = methods.resolve("small10-toy", "lora")
        assert first.adapter.value == "lora" and methods.resolve("small10-toy", "lora") is first
        methods.unregister("small10-toy")
        with pytest.raises(VramplanError):
            methods.resolve("small10-toy", "lora")
        methods.register("small10-toy", {**entry, "adapters": ["full", "lora"], "sequences_per_example": 2})
        again = methods.resolve("small10-toy", "lora")
        assert again.method is methods.get_method("small10-toy") and again.sequences_per_example == 2
        assert methods.resolve("small10-toy").adapter.value == "full"
    finally:
        methods.unregister("small10-toy")


def test_refusals_are_raised_every_time():
    for _ in range(2):
        with pytest.raises(VramplanError):
            methods.resolve("lora", "nosuch")
        with pytest.raises(VramplanError):
            methods.resolve("nosuch")
        with pytest.raises(VramplanError):
            methods.resolve("dpo+qlora", "lora")
        with pytest.raises(VramplanError):
            methods.resolve("full", "qlora")


def test_kept_names_and_behaviours_are_the_recipes():
    import dataclasses

    for method, adapter in _asked_names():
        r = methods._resolve(method, adapter)
        for _ in range(2):
            want = r.method.name if r.adapter.value == r.method.name else f"{r.method.name}+{r.adapter.value}"
            assert r.name == want
            assert r.behaviour is methods.load_behaviour(r.method.behaviour_name) is r.method.behaviour
        for other in r.method.adapters:
            swapped = dataclasses.replace(r, adapter=other)
            assert swapped.name == methods._resolve(r.method, other).name
        assert r == methods._resolve(method, adapter) and hash(r) == hash(methods._resolve(method, adapter))


def test_kept_effective_regimes_equal_regimes_worked_out_anew(monkeypatch):
    from vramplan import precision, stacks

    pairs = [(p, f) for p in precision.REGIMES for f in stacks.stacks()]
    for _ in range(2):
        for p, f in pairs:
            assert stacks.effective_regime(p, f) == stacks._effective_regime(precision.get_regime(p),
                                                                             stacks.get_stack(f)), (p, f)
    p, f = "bf16-mixed", "hf"
    before = stacks.effective_regime(p, f)
    other = dict(stacks.stacks())
    other[f] = dataclasses.replace(other[f], adapter_dtype="float32", runner="loop")
    monkeypatch.setattr(stacks, "stacks", lambda: other)
    after = stacks.effective_regime(p, f)
    assert after == stacks._effective_regime(precision.get_regime(p), other[f]) and after != before
    monkeypatch.setitem(precision.REGIMES, p, dataclasses.replace(precision.REGIMES[p], compute_dtype="float16"))
    assert stacks.effective_regime(p, f) == stacks._effective_regime(precision.REGIMES[p], other[f])


def _long_find(gpu_name):
    import os

    from vramplan import profiles

    env = os.environ.get("VRAMPLAN_PROFILES", "")
    dirs = profiles._resolve_search(env, os.getcwd(), profiles.REPO_DIR, profiles.PACKAGE_DIR)
    for d in dirs:
        p = os.path.join(d, f"{profiles.profile_key(gpu_name)}.json")
        if os.path.isfile(p):
            return profiles.Path(p)
    return None


def test_profile_lookups_see_files_and_directories_as_they_are(tmp_path, monkeypatch):
    from vramplan import profiles
    from vramplan.errors import ProfileError

    a, b, cwd, pkg = (tmp_path / n for n in ("a", "b", "cwd", "pkg"))
    for d in (a, b, cwd / "profiles", pkg):
        d.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("VRAMPLAN_PROFILES", str(a))
    cards = ["rtx4000ada", "H100 SXM", "t4"]

    def check():
        for card in cards:
            for _ in range(2):
                assert profiles.find_profile(card) == _long_find(card), card

    check()
    assert profiles.find_profile("t4") is None
    (b / "t4.json").write_text("{}")
    check()
    monkeypatch.setenv("VRAMPLAN_PROFILES", str(b))
    check()
    assert profiles.find_profile("t4") == profiles.Path(b.resolve() / "t4.json")
    (cwd / "profiles" / "h100-sxm.json").write_text("{}")
    check()
    assert profiles.find_profile("H100 SXM") == profiles.Path(cwd.resolve() / "profiles" / "h100-sxm.json")
    (b / "h100-sxm.json").write_text("{}")
    check()
    assert profiles.find_profile("H100 SXM").parent == b.resolve()
    (b / "h100-sxm.json").unlink()
    (pkg / "rtx4000ada.json").write_text("{}")
    check()
    monkeypatch.setattr(profiles, "PACKAGE_DIR", pkg)
    check()
    assert profiles.find_profile("rtx4000ada") == profiles.Path(pkg.resolve() / "rtx4000ada.json")
    monkeypatch.chdir(tmp_path)
    check()
    assert profiles.find_profile("H100 SXM") is None
    for _ in range(2):
        with pytest.raises(ProfileError):
            profiles.find_profile("///")


def _helps(parser) -> list[str]:
    import argparse

    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [parser.format_help()] + [p.format_help() for p in subs.choices.values()]


@pytest.mark.parametrize("only", [None, "fit"])
def test_parsers_built_with_messages_looked_up_once_are_argparses(monkeypatch, only):
    import argparse

    from vramplan import cli

    calls = []

    def translating(message):
        calls.append(message)
        return f"<{message.upper()}>"

    monkeypatch.setattr(argparse, "_", translating)
    parser = cli._parser_for(only)
    assert argparse._ is translating
    assert len(calls) == len(set(calls)) == 3  # once each
    kept = _helps(parser)
    assert len(kept) == 10 and all("<OPTIONS>" in h for h in kept) and "<POSITIONAL ARGUMENTS>" in kept[0]
    calls.clear()
    parser = cli._build_parser(only)
    assert len(calls) == 30  # the long way: each parser's own
    assert kept == _helps(parser)


def test_argparses_lookup_is_put_back_when_the_build_fails(monkeypatch):
    import argparse

    from vramplan import cli

    real = argparse._

    def broken(only):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_build_parser", broken)
    with pytest.raises(RuntimeError):
        cli._parser_for("fit")
    assert argparse._ is real


def test_adapter_flags_are_each_adapters():
    from vramplan.methods import Adapter

    assert {a.value for a in Adapter} == {"full", "lora", "qlora", "dora", "qdora", "ia3", "qia3"}
    for a in Adapter:
        v = a.value
        assert a.is_peft is (v != "full")
        assert a.quantized_base is (v in ("qlora", "qdora", "qia3"))
        assert a.low_rank is (v in ("lora", "qlora", "dora", "qdora"))
        assert a.dora is (v in ("dora", "qdora"))
        assert a.ia3 is (v in ("ia3", "qia3"))
        assert a.peft_type == {"full": None, "ia3": "IA3", "qia3": "IA3"}.get(v, "LORA")
