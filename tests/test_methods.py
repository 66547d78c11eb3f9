"""The method plug-in point (vramplan.methods): behaviours reached through the registry, options as data,
and a toy method registered from a test (a behaviour module plus an entry) planned and traced without
editing a library file."""

import subprocess
import sys
import textwrap

import pytest

import vramplan
from conftest import TINY_LLAMA
from vramplan import methods
from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.methods import Behaviour, Option, all_options, resolve
from vramplan.models import from_hf_config

TINY = dict(TINY_LLAMA)

TOY_MODULE = '''
from vramplan.methods.base import Behaviour, Option


class Toy(Behaviour):
    options = (Option(name="toy_knob", kind="int", default=3, flag="--toy-knob", help="a toy knob", hi=64,
                      trainer_keys=("toy_knob",)),
               Option(name="toy_mode", kind="str", default="a", choices=("a", "b")),)
    step = "vramplan.runtime.steps:sft_step"
    takes_adapter_choice = True
    trainer_names = ("ToyConfig",)
    axolotl_rl = ("toy",)

    def assumptions(self, cfg):
        return [f"TOY: knob {cfg.option('toy_knob')}, mode {cfg.option('toy_mode')}"]

    def dryrun_assumptions(self, cfg):
        return ["TOY traced with the SFT step"]


BEHAVIOUR = Toy()
'''

TOY_ENTRY = {
    "summary": "a toy method of the plug-in test", "source": "tests/test_methods.py", "behaviour": "toy_behaviour",
    "adapters": ["lora", "full"], "sequences_per_example": 1, "rollout": False,
    "copies": [{"role": "policy", "trains": True, "head": "lm", "forward": "grad"}],
}


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_behaviour.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    methods.register("toy", TOY_ENTRY)
    yield from_hf_config(TINY, name="tiny-llama")
    methods.unregister("toy")
    methods.load_behaviour.cache_clear()
    sys.modules.pop("toy_behaviour", None)


def test_behaviours_are_reached_by_data():
    assert type(resolve("lora").behaviour).__name__ == "SFT"
    assert type(resolve("dpo+qlora").behaviour).__name__ == "DPO"
    ppo = resolve("ppo").behaviour
    assert ppo.generates and ppo.option("ppo_response").cli_flag == "--ppo-response"
    assert ppo.step == "vramplan.runtime.steps:ppo_step"
    assert not resolve("full").behaviour.takes_adapter_choice and resolve("dpo").behaviour.takes_adapter_choice
    assert "ppo_response" in {o.name for o in all_options()}
    for md in methods.registry().values():  # the data's rollout flag and the behaviour agree
        assert md.rollout == md.behaviour.generates


def test_ppo_response_is_ppo_option():
    spec = from_hf_config(TINY, name="tiny-llama")
    cfg = make_config(spec, "ppo", seq=256)
    assert cfg.ppo_response == 128 and cfg.option("ppo_response") == 128
    assert make_config(spec, "ppo", seq=256, ppo_response=100).ppo_response == 100
    assert make_config(spec, "ppo", seq=256, method_options={"ppo_response": 60}).option("ppo_response") == 60
    gen = cfg.recipe.behaviour.generation(cfg)
    assert (gen.prompt_tokens, gen.generated_tokens) == (128, 128)
    assert cfg.with_(**cfg.recipe.behaviour.reset_shape()).ppo_response is None
    with pytest.raises(VramplanError, match="response tokens"):
        make_config(spec, "ppo", seq=256, ppo_response=256)
    with pytest.raises(VramplanError, match="unknown method option"):
        make_config(spec, "ppo", method_options={"nope": 1})
    assert "options" not in cfg.to_dict()  # the JSON of the built-in methods is unchanged


def test_toy_method_is_planned_without_library_edits(toy):
    spec = toy
    cfg = make_config(spec, "toy", adapter="lora", seq=64, method_options={"toy_knob": 7})
    assert cfg.option("toy_knob") == 7 and cfg.option("toy_mode") == "a"
    assert cfg.recipe.name == "toy+lora"
    hash(cfg)
    assert cfg.to_dict()["options"] == {"toy_knob": 7, "toy_mode": "a"}
    with pytest.raises(VramplanError, match="toy-knob"):
        make_config(spec, "toy", method_options={"toy_knob": 65})
    with pytest.raises(VramplanError):
        make_config(spec, "toy", method_options={"toy_mode": "c"})
    # options of another method are ignored by this one
    assert make_config(spec, "lora", method_options={"toy_knob": 7}).options == ()
    est = vramplan.estimate(spec, "toy", adapter="lora", seq=64, gpu="rtx4090", method_options={"toy_knob": 5})
    assert "TOY: knob 5, mode a" in est.assumptions
    lora = vramplan.estimate(spec, "lora", seq=64, gpu="rtx4090")
    assert est.peak_bytes == lora.peak_bytes  # the toy's data is LoRA's: the same plan
    rep = vramplan.fit(spec, "rtx4090", methods=["toy"], seq=64, method_options={"toy_knob": 5}, advise=False)
    assert rep.rows and rep.rows[0].method.startswith("toy")
    from vramplan.cli import build_parser

    args = build_parser().parse_args(["estimate", "--model", "x", "--method", "toy", "--toy-knob", "9"])
    assert args.toy_knob == 9
    from vramplan.bands import method_key

    assert method_key("toy", "lora") == "toy+lora"
    assert methods.method_named_by("trainer_names", "ToyConfig") == "toy"
    assert methods.method_named_by("axolotl_rl", "toy") == "toy"


def test_toy_method_is_traced(toy):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from vramplan.dryrun import dryrun

    res = dryrun(toy, "toy", adapter="lora", batch=1, seq=32, method_options={"toy_knob": 4})
    lora = dryrun(toy, "lora", batch=1, seq=32)
    assert "TOY traced with the SFT step" in res.assumptions
    assert res.tensor_peak_bytes == lora.tensor_peak_bytes


def test_a_bad_behaviour_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(VramplanError, match="cannot be imported"):
        methods.register("ghost", {**TOY_ENTRY, "behaviour": "no_such_behaviour_module"})
    assert "ghost" not in methods.registry()
    (tmp_path / "half_behaviour.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(VramplanError, match="defines no BEHAVIOUR"):
        methods.register("half", {**TOY_ENTRY, "behaviour": "half_behaviour"})
    with pytest.raises(VramplanError, match="generates"):
        methods.register("liar", {**TOY_ENTRY, "behaviour": "sft", "rollout": True})


def test_option_validation():
    o = Option(name="g", kind="int", default=8, lo=2, hi=64)
    assert o.validate(None) is None and o.validate(4) == 4
    for bad in (1, 65, "4", 2.5, True):
        with pytest.raises(VramplanError):
            o.validate(bad)
    f = Option(name="u", kind="float", lo=0.0, hi=1.0)
    assert f.validate(0.3) == 0.3
    with pytest.raises(VramplanError):
        f.validate(1.5)
    assert Behaviour().generation(None) is None and Behaviour().min_seq() == 128


def test_methods_package_imports_no_torch():
    code = "import sys, vramplan.methods as m; [m.load_behaviour(n) for n in ('sft', 'dpo', 'ppo')]; " \
           "print(any(k in sys.modules for k in ('torch', 'transformers', 'peft')))"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_sixteen_bit_twin_is_the_four_bit_fallback_inverted():
    from vramplan.methods import Adapter, sixteen_bit_twin

    for ad in Adapter:
        assert ad.four_bit is None or ad.four_bit.sixteen_bit is ad
        assert (ad.sixteen_bit is not None) == ad.quantized_base
    assert [sixteen_bit_twin(n) for n in ("qlora", "dpo+qlora", "dpo+qdora", "qia3", "lora", "dpo", "full", "nope")] == [
        "lora", "dpo+lora", "dpo+dora", "ia3", None, None, None, None]
