"""Optimisers and precision regimes are data (optimizers.toml, precisions.toml) read through attributes."""

import importlib.util

import pytest

from vramplan.errors import VramplanError
from vramplan.optimizers import OPTIMIZERS, _parse, get_optimizer
from vramplan.precision import REGIMES, _parse as parse_regime, get_regime


def test_state_bytes_follow_each_optimizers_sources():
    n, pb = 4096 * 11008, 2
    assert get_optimizer("adamw").state_bytes((4096, 11008), pb) == 2 * n * pb + 4  # exp_avg, exp_avg_sq, step
    assert get_optimizer("paged_adamw_32bit").state_bytes((4096, 11008), pb) == 2 * n * 4 + 4
    blocks = -(-n // 256)
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        opt = get_optimizer(name)
        assert opt.state_bytes((4096, 11008), pb) == 2 * n + 2 * blocks * 4 + 4
        assert opt.state_bytes((4095,), 4) == 2 * 4095 * 4 + 4  # below min_8bit_size: fp32 states
    assert get_optimizer("sgd").state_bytes((4096, 11008), pb) == 0
    ada = get_optimizer("adafactor")
    assert ada.state_bytes((4096, 11008), pb) == (4096 + 11008) * pb + 4  # row + column vectors
    assert ada.state_bytes((4096,), pb) == 4096 * pb + 4


def test_step_temporaries_depend_on_the_runner_only_where_the_kernel_does():
    groups = [((64, 32), 3, 2), ((16,), 2, 4)]
    adamw = get_optimizer("adamw")
    assert adamw.step_temporary_bytes(groups, "loop") == 3 * 64 * 32 * 2 + 2 * 16 * 4  # foreach sqrt
    assert adamw.step_temporary_bytes(groups, "trainer") == 0  # fused
    assert get_optimizer("adafactor").step_temporary_bytes(groups, "trainer") == 64 * 32 * 4 * 3
    assert get_optimizer("adafactor").step_temporary_bytes([], "loop") == 0
    for name in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"):
        assert get_optimizer(name).step_temporary_bytes(groups, "loop") == 0


def test_update_bytes_and_bandwidth_come_from_the_catalogue():
    assert get_optimizer("adamw").update_bytes_per_param(2, loop=False) == 14
    assert get_optimizer("adamw").update_bytes_per_param(2, loop=True) == 21  # foreach temporaries
    assert get_optimizer("adamw_8bit").update_bytes_per_param(2, loop=True) == 10
    assert get_optimizer("paged_adamw_32bit").update_bytes_per_param(4, loop=False) == 28
    assert get_optimizer("adafactor").bandwidth_efficiency == 0.5


def test_every_optimizer_names_a_constructible_class_and_a_source():
    for opt in OPTIMIZERS.values():
        assert opt.source and opt.summary
        for path in filter(None, (opt.cls, opt.cuda_class)):
            module = path.split(":")[0]
            if opt.package and importlib.util.find_spec(opt.package) is None:
                continue
            if module.startswith("vramplan."):
                continue
            mod = importlib.import_module(module)
            assert hasattr(mod, path.split(":")[1]), path
        if opt.paged:
            assert opt.cuda_class and opt.state_label


def test_a_broken_catalogue_entry_is_one_clear_error():
    good = {"summary": "s", "source": "x", "states": 1, "stream_param_bytes": 1, "bandwidth_efficiency": 1.0,
            "class": "torch.optim:SGD"}
    assert _parse("toy", good).states == 1
    for bad in ({**good, "state_bytes": "fp8"}, {**good, "typo": 1}, {**good, "bandwidth_efficiency": 2.0},
                {k: v for k, v in good.items() if k != "class"}, {**good, "paged": True}):
        with pytest.raises(VramplanError, match="optimizers.toml"):
            _parse("toy", bad)


def test_regimes_are_data_with_their_attributes():
    assert get_regime("fp16-mixed").grad_scaler and not get_regime("bf16-mixed").grad_scaler
    assert get_regime("bf16").autocast is None and get_regime("bf16").runner == "loop"
    assert all(r.source for r in REGIMES.values())
    row = {"trainable_dtype": "float32", "frozen_dtype": "float8", "adapter_dtype": "float32", "autocast": "none",
           "compute_dtype": "float32", "runner": "trainer", "summary": "s", "source": "x"}
    with pytest.raises(VramplanError, match="precisions.toml"):
        parse_regime("toy", row)
    with pytest.raises(VramplanError, match="precisions.toml"):
        parse_regime("toy", {k: v for k, v in row.items() if k != "runner"})


def test_the_runtime_builds_each_optimizer_from_its_catalogue_entry():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from vramplan.runtime.build import FusedAdamWOnMeta, make_optimizer

    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    notes: list[str] = []

    class Cfg:
        optimizer = "adamw"

    opt = make_optimizer(p, Cfg, get_regime("bf16"), "cuda", False, notes)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["foreach"] is True
    meta = [torch.nn.Parameter(torch.zeros(4, 4, device="meta"))]
    assert isinstance(make_optimizer(meta, Cfg, get_regime("bf16-mixed"), "cuda", True, notes), FusedAdamWOnMeta)
    Cfg.optimizer = "sgd"
    assert type(make_optimizer(p, Cfg, get_regime("bf16-mixed"), "cpu", False, notes)) is torch.optim.SGD
    if importlib.util.find_spec("bitsandbytes") is not None:
        Cfg.optimizer = "paged_adamw_8bit"
        opt = make_optimizer(p, Cfg, get_regime("bf16-mixed"), "cpu", False, notes)
        assert type(opt).__name__ == "AdamW8bit"  # paged only on a real CUDA device, with a note
        assert notes[-1].startswith("paged_adamw_8bit: its 8-bit states are counted as device tensors")


def test_trainer_optimizer_names_come_from_the_catalogue():
    from vramplan.integrations.request import OPTIMIZERS as TRAINER_NAMES, map_optimizer

    assert TRAINER_NAMES["adamw_torch_fused"] == "adamw" and TRAINER_NAMES["adamw_bnb_8bit"] == "adamw_8bit"
    # HF optim="paged_adamw_32bit" is bitsandbytes PagedAdamW32bit: its own entry (fp32 states, paged)
    assert map_optimizer("paged_adamw_32bit", []) == "paged_adamw_32bit"
    assert set(TRAINER_NAMES.values()) == set(OPTIMIZERS)
    with pytest.raises(VramplanError, match="not modelled"):
        map_optimizer("lion_32bit", [])


def test_an_optimizer_keeping_anothers_states_is_evaluated_and_listed_as_that_one(monkeypatch):
    """``same_states_as`` (optimizers.toml): paged 8-bit AdamW keeps 8-bit AdamW's states; the search keys the two
    as one from the data (another optimiser given it is keyed so too), and the catalogue refuses a twin whose states
    differ."""
    import vramplan.optimizers as opts_mod
    from dataclasses import replace

    from vramplan.config import make_config
    from vramplan.models import get_model
    from vramplan.planner.search import _shared_key

    assert get_optimizer("paged_adamw_8bit").same_states_as == "adamw_8bit"
    cfg = make_config(get_model("llama-3.2-1b"), "lora")
    key = _shared_key(cfg.with_(optimizer="adamw_8bit"), True)
    assert _shared_key(cfg.with_(optimizer="paged_adamw_8bit"), True) == key
    assert _shared_key(cfg.with_(optimizer="paged_adamw_32bit"), True) != _shared_key(cfg.with_(optimizer="adamw"), True)
    twin = replace(OPTIMIZERS["paged_adamw_32bit"], same_states_as="adamw")
    monkeypatch.setitem(opts_mod._AS_WRITTEN, "paged_adamw_32bit", twin)
    assert _shared_key(cfg.with_(optimizer="paged_adamw_32bit"), True) == _shared_key(cfg.with_(optimizer="adamw"), True)

    data = {name: dict(e) for name, e in opts_mod.load_data("optimizers.toml").items()}
    data["paged_adamw_32bit"]["same_states_as"] = "adamw_8bit"  # two fp32 states vs two 8-bit ones
    monkeypatch.setattr(opts_mod, "load_data", lambda _name: data)
    opts_mod.optimizers.cache_clear()
    try:
        with pytest.raises(VramplanError, match="same_states_as"):
            opts_mod.optimizers()
    finally:
        monkeypatch.undo()
        opts_mod.optimizers.cache_clear()


def test_the_searched_optimizers_and_their_sentences_are_catalogue_data(monkeypatch):
    """``searched`` and ``title`` (optimizers.toml): the search, its preference order and the matrix's ladder read the
    searched optimisers in the catalogue's order; a plan's reason and a matrix cell name an optimiser by its title,
    "updates slower" only where its update costs more than the best plan's (paged 8-bit AdamW ties 8-bit AdamW's);
    a catalogue that searches no optimiser is refused."""
    import vramplan.optimizers as opts_mod
    from vramplan.matrix import SETTINGS_LADDER, Cell
    from vramplan.planner import search as search_mod
    from vramplan.verdict import Verdict

    searched = tuple(n for n, o in OPTIMIZERS.items() if o.searched)
    assert opts_mod.searched_optimizers() == searched == search_mod.OPTIMIZERS == ("adamw", "adamw_8bit",
                                                                                   "paged_adamw_8bit")
    assert [opt for gc, opt in SETTINGS_LADDER if not gc] == list(searched)
    gcs, opts, _ = search_mod._searched(__import__("vramplan.gpus", fromlist=["x"]).get_gpu("rtx4090"), {})
    assert opts == list(searched)

    class P:  # the two fields _differences reads of a plan besides its config
        adapter, parallel = "lora", None

        def __init__(self, cfg):
            self.config = cfg
    from vramplan.config import make_config
    from vramplan.models import get_model

    cfg = make_config(get_model("llama-3.2-1b"), "lora")

    def diff(opt, best_opt):
        return search_mod._differences(P(cfg.with_(optimizer=opt)), P(cfg.with_(optimizer=best_opt)))
    assert diff("adamw_8bit", "adamw") == ["8-bit AdamW updates slower"]
    assert diff("paged_adamw_8bit", "adamw") == ["paged 8-bit AdamW updates slower"]
    assert diff("adamw", "adamw_8bit") == ["AdamW"]
    assert diff("paged_adamw_8bit", "adamw_8bit") == ["paged 8-bit AdamW"]  # the same update: not slower
    assert diff("adafactor", "adamw") == ["Adafactor"]  # 12 B at half the bandwidth share < AdamW's 28 B
    assert diff("adamw", "adafactor") == ["AdamW updates slower"]

    cell = Cell(model="m", method="full", gpu="g", seq=1, batch=1, verdict=Verdict.TIGHT, peak_bytes=1,
                tensor_peak_bytes=1, capacity_bytes=2, max_batch=1, grad_ckpt=True, optimizer="paged_adamw_8bit",
                precision=None)
    assert cell.settings_label == "GC + paged 8-bit AdamW"
    assert Cell(**{**vars(cell), "optimizer": "adamw", "grad_ckpt": False}).settings_label == ""

    data = {name: {k: v for k, v in e.items() if k != "searched"}
            for name, e in opts_mod.load_data("optimizers.toml").items()}
    data["sgd"]["searched"] = True
    monkeypatch.setattr(opts_mod, "load_data", lambda _name: data)
    opts_mod.optimizers.cache_clear()
    try:
        assert opts_mod.searched_optimizers() == ("sgd",)
        for e in data.values():
            e.pop("searched", None)
        opts_mod.optimizers.cache_clear()
        with pytest.raises(VramplanError, match="no optimiser is searched"):
            opts_mod.optimizers()
    finally:
        monkeypatch.undo()
        opts_mod.optimizers.cache_clear()


@pytest.mark.parametrize("runner", ["loop", "trainer"])
def test_a_runner_is_read_by_what_it_does_not_its_name(runner, monkeypatch):
    """vramplan.precision.RUNNERS: a twin of each runner under another name, given to the regimes that name it,
    plans every method to the byte as the original (fp32 outputs: the logits the losses keep; the fused or foreach
    optimiser kernel: step temporaries and update time). Fails wherever a layer still compares "loop"/"trainer"."""
    from dataclasses import replace

    import vramplan.precision as prec
    from vramplan.config import make_config
    from vramplan.gpus import get_gpu
    from vramplan.memory import step_memory
    from vramplan.models import get_model
    from vramplan.throughput import step_time

    spec, gpu = get_model("llama-3.2-1b"), get_gpu("a100-80gb")
    names = [n for n, r in REGIMES.items() if r.runner == runner]
    cases = [(m, p, a) for m in ("full", "lora", "dpo", "ppo", "grpo", "kto", "orpo") for p in names
             for a in ("sdpa", "eager")]

    def figures():
        import vramplan.memory as memory

        memory._STATE_CACHE.clear()  # model states are kept by the configuration's fields (the regime's name)
        memory._BASE_CACHE.clear()
        out = []
        for m, p, a in cases:
            cfg = make_config(spec, m, precision=p, batch=2, seq=256, attn=a)
            mem = step_memory(spec, cfg)
            out.append((int(mem.peak), {c: int(v) for c, v in mem.components.items()},
                        {ph: int(v) for ph, v in mem.phases.items()}, float(step_time(spec, cfg, gpu).step_s)))
        return out
    before = figures()
    twin = runner + "_twin"
    monkeypatch.setitem(prec.RUNNERS, twin, replace(prec.RUNNERS[runner], name=twin))
    for n in names:
        monkeypatch.setitem(prec.REGIMES, n, replace(REGIMES[n], runner=twin))
    assert get_regime(names[0]).training_loop.name == twin
    assert figures() == before
