"""The measurement record, its importers and the published-accuracy accounting (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.errors import VramplanError
from vramplan.measurements.importers import (import_csv, import_file, load_mapping, one_card, parse_gpu,
                                             parse_method, parse_seq, parse_targets, parse_value, split_by_card)
from vramplan.measurements.record import (SCHEMA, MeasurementRecord, dump_records, fit_usable_points, from_log,
                                          load_records, require_fit_points)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "measurements" / "published.csv"
SOURCES = ROOT / "measurements" / "sources.toml"


def _rec(**over) -> dict:
    d = {"schema": SCHEMA,
         "config": {"model": "llama-2-7b", "method": "lora", "adapter": "lora", "batch": 2, "seq": 512,
                    "seq_bound": "max", "stack": "hf"},
         "device": {"name": "rtx4090"},
         "measurement": {"outcome": "measured", "quantity": "max_reserved", "bytes": 10 * 2**30},
         "source": {"kind": "published", "id": "x", "ref": "owner/repo:README.md @abc"}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def test_record_round_trip_and_atomic_file(tmp_path):
    r = MeasurementRecord.from_dict(_rec())
    assert r.usable_for_fit and r.card_key == "rtx4090"
    path = dump_records([r, r], tmp_path / "r.jsonl")
    back = load_records(path)
    assert [b.to_dict() for b in back] == [r.to_dict()] * 2
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("bad,needle", [
    ({"schema": "vramplan.measurement/0"}, "schema"),
    ({"measurement": {"quantity": "peak"}}, "quantity"),
    ({"measurement": {"outcome": "measured", "bytes": None}}, "needs bytes"),
    ({"measurement": {"bytes": -5}}, "bytes"),
    ({"config": {"seq_bound": "<=512"}}, "seq_bound"),
    ({"config": {"gpus": 0}}, "gpus"),
    ({"config": {"colour": "red"}}, "unknown field"),
    ({"source": {"kind": "published", "id": "x", "ref": None}}, "ref"),
    ({"estimated": "no"}, "estimated"),
])
def test_record_validation_is_one_line(bad, needle):
    with pytest.raises(VramplanError) as exc:
        MeasurementRecord.from_dict(_rec(**bad))
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg.split(" (hint")[0]


def test_bad_records_file_is_a_one_line_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(_rec()) + "\n{not json\n")
    with pytest.raises(VramplanError, match="line 2"):
        load_records(p)


@pytest.mark.parametrize("text,unit,expected", [
    ("16.69", "GB", ("measured", 16_690_000_000)),
    ("4.98", "GiB", ("measured", int(round(4.98 * 2**30)))),
    ("32853", "MB", ("measured", 32_853_000_000)),
    ("22.8G", "GB", ("measured", 22_800_000_000)),
    ("2*24G", "GB", ("measured", 24_000_000_000)),
    ("72-80", "GB", ("measured", 72_000_000_000)),
    ("OOM", "GB", ("oom", None)),
    ("OOM (40000)", "MB", ("oom", None)),
    ("fits (no number)", "GB", ("fit_only", None)),
    # third-party spellings: a unit in any case, thousands separators, approximate figures, upper bounds
    ("44.8 gb", "GiB", ("measured", 44_800_000_000)),
    ("18,432 MiB", "GB", ("measured", 18_432 * 2**20)),
    ("~9.5", "GiB", ("measured", int(round(9.5 * 2**30)))),
    ("<= 24 GB", "GB", ("fit_only", None)),
    ("CUDA out of memory", "GB", ("oom", None)),
])
def test_parse_value_units_and_outcomes(text, unit, expected):
    assert parse_value(text, unit)[:2] == expected


def test_parse_cells():
    assert parse_seq("<=512 (max_seq_length 512)") == (512, "max", None)
    assert parse_seq("2048 (packed)") == (2048, "exact", True)
    assert parse_seq("unknown (swift default)") == (None, "unknown", None)
    assert parse_seq("dynamic, longest Alpaca sample (~1304)") == (1304, "max", None)
    assert parse_gpu("4xA10G 24GB")[:2] == (4, "a10g")
    assert parse_gpu("unknown (presumably A100-SXM4-40GB)")[1] is None
    assert parse_gpu("2x 24GB GPUs")[2] == 24 * 10**9
    assert parse_method("QLoRA (FSDP + CPU offload)")[:4] == ("qlora", "qlora", "fsdp", "cpu")
    assert parse_method("LoRA (DDP (FSDP sharding_strategy ddp))")[2] == "ddp"
    assert parse_method("ORPO + LoRA (beta 0.5)")[:2] == ("orpo", "lora")  # modelled since issue 14
    assert parse_targets("q,v (lora_query,lora_value only)")[0] == ("q_proj", "v_proj")
    assert parse_targets("q_proj,v_proj (alpha 16)")[0] == ("q_proj", "v_proj")
    assert parse_targets("q,k,v,proj,mlp,head (litgpt)")[0] == ("all-linear",)
    from vramplan.measurements.importers import parse_optimizer, parse_quantity

    assert parse_optimizer("RMSprop (optim: rmsprop)")[0] is None  # not AdamW by default: not modelled
    assert parse_quantity("torch.cuda.max_memory_reserved()", "unknown_peak") == ("max_reserved", "")
    assert parse_quantity("", "max_allocated") == ("max_allocated", "")
    assert parse_quantity("a peak", "max_allocated")[0] == "unknown_peak"


def test_ms_swift_rows_take_the_stacks_default_max_length():
    """ms-swift's RLHF scripts set no --max_length: SftArguments.max_length = 2048 bounds each sample
    (sources.toml seq_unknown), so the DPO/ORPO LoRA rows are planned at that bound."""
    recs = [r for r in import_csv(CORPUS, load_mapping(SOURCES)) if r.source.id == "ms-swift-RLHF-docs"]
    dpo = [r for r in recs if r.config.method == "dpo"]
    assert dpo and all((r.config.seq, r.config.seq_bound, r.config.dropout) == (2048, "max", 0.05) for r in dpo)
    assert "2048 tokens as the bound" in dpo[0].notes


def test_published_corpus_imports_every_row_with_its_source():
    recs = import_csv(CORPUS, load_mapping(SOURCES))
    assert len(recs) == 149
    assert all(r.source.ref and r.source.id for r in recs)
    assert sum(r.estimated for r in recs) == 12  # LLaMA-Factory's rule of thumb: never fitted
    assert not any(r.usable_for_fit for r in recs if r.estimated)
    # the quantity and unit each source printed
    by = {r.source.id: r for r in recs}
    assert by["litgpt-config_hub"].measurement.quantity == "max_allocated"
    assert by["litgpt-config_hub"].measurement.unit == "GB"
    assert by["answerai-fsdp_qlora-benchmarks"].measurement.quantity == "max_reserved"
    assert by["answerai-fsdp_qlora-benchmarks"].measurement.unit == "GiB"
    # a litgpt "4xA10G" row of a devices: 1 config is the single-GPU run; devices: 4 runs FSDP
    r1 = [r for r in recs if r.source.id == "litgpt-config_hub" and r.source.row == 1][0]
    r3 = [r for r in recs if r.source.id == "litgpt-config_hub" and r.source.row == 3][0]
    assert (r1.config.gpus, r1.config.strategy) == (1, None)
    assert (r3.config.gpus, r3.config.strategy) == (4, "fsdp")


def test_import_csv_needs_its_columns(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(VramplanError, match="no column"):
        import_csv(p)


def _callback_log(tmp_path, card="rtx4090", split="fit", memory=True):
    pt = {"kind": "point", "source": "VramplanCallback", "id": "p1", "split": split, "status": "ok",
          "model": "llama-3.2-1b", "config": {"method": "lora", "adapter": "lora", "batch": 2, "seq": 256},
          "device": {"catalogue": card, "name": card}, "gpu": card}
    if memory:
        pt["memory"] = {"max_allocated": 3 * 2**30, "max_reserved": 4 * 2**30}
    else:  # the field names of the callback's first logs
        pt["measured"] = {"max_allocated_bytes": 3 * 2**30}
    return pt


def test_callback_and_runner_logs_become_records(tmp_path):
    session = {"kind": "session", "session": "s1", "gpu": "l4", "device": {"name": "NVIDIA L4", "total_bytes": 23 * 2**30},
               "versions": {"torch": "2.5.0", "transformers": "4.46.0"}}
    runner = {"kind": "point", "session": "s1", "id": "r1", "split": "fit", "status": "ok", "model": "smollm2-135m",
              "config": {"method": "full", "adapter": "full", "batch": 1, "seq": 128, "framework": "hf"},
              "memory": {"max_allocated": 2**30, "max_reserved": 2**31, "nvml_process_bytes": 3 * 2**30},
              "step_s_median": 0.5, "tokens_per_s": 256.0}
    oom = {**runner, "id": "r2", "status": "oom", "memory": {}}
    recs = from_log([session, runner, oom, _callback_log(tmp_path), _callback_log(tmp_path, memory=False)])
    kinds = [(r.source.kind, r.measurement.outcome, r.measurement.quantity) for r in recs]
    assert ("runner", "measured", "device_total") in kinds and ("runner", "oom", "unknown_peak") in kinds
    assert sum(k[0] == "callback" for k in kinds) == 3  # two quantities, then the old log's allocated
    rr = [r for r in recs if r.source.kind == "runner" and r.measurement.outcome == "measured"][0]
    assert rr.device.name == "l4" and rr.config.stack_version == "4.46.0" and rr.measurement.tokens_per_s == 256.0


def test_a_log_that_mixes_cards_is_refused_or_split(tmp_path):
    log = tmp_path / "mixed.jsonl"
    log.write_text("\n".join(json.dumps(_callback_log(tmp_path, card=c)) for c in ("rtx4090", "l4")) + "\n")
    recs = import_file(log)
    with pytest.raises(VramplanError, match="mixes measurements of 2 cards"):
        one_card(recs, log)
    assert set(split_by_card(recs)) == {"rtx4090", "l4"}


def test_fit_only_refuses_a_log_without_usable_points(tmp_path):
    old = [_callback_log(tmp_path, split="user", memory=False)]
    assert fit_usable_points(old) == 0
    with pytest.raises(VramplanError, match="refusing to write a profile"):
        require_fit_points(old, "user.jsonl")
    assert fit_usable_points([_callback_log(tmp_path)]) == 1


def test_cli_import_writes_records_and_refuses_mixed_logs(tmp_path, capsys):
    from vramplan.cli import main

    out = tmp_path / "pub.jsonl"
    assert main(["calibrate", "--import", str(CORPUS), "--map", str(SOURCES), "--import-out", str(out)]) == 0
    assert len(load_records(out)) == 149
    assert "imported 149 records" in capsys.readouterr().out
    log = tmp_path / "mixed.jsonl"
    log.write_text("\n".join(json.dumps(_callback_log(tmp_path, card=c)) for c in ("rtx4090", "l4")) + "\n")
    assert main(["calibrate", "--import", str(log), "--import-out", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "mixes measurements of 2 cards" in err and len(err.strip().splitlines()) == 1
    assert main(["calibrate", "--import", str(log), "--split-by-card", "--import-out", str(tmp_path / "cards")]) == 0
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == ["l4.jsonl", "rtx4090.jsonl"]
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps(_callback_log(tmp_path, split="user", memory=False)) + "\n")
    assert main(["calibrate", "--fit-only", str(old), "--no-report"]) == 2
    assert "refusing to write a profile" in capsys.readouterr().err
    assert not old.with_suffix(".json").exists()


def test_band_reaching_capacity_makes_a_plan_tight():
    from vramplan.verdict import Verdict, classify

    cap = 24 * 2**30
    assert classify(0.80 * cap, cap) is Verdict.COMFORTABLE
    assert classify(0.80 * cap, cap, band_hi=0.30) is Verdict.TIGHT   # 0.8 x 1.3 > 1
    assert classify(0.80 * cap, cap, band_hi=0.20) is Verdict.COMFORTABLE
    assert classify(1.01 * cap, cap, band_hi=0.30) is Verdict.NO


def test_estimate_states_its_band_and_versions():
    import vramplan
    from vramplan.bands import band_for

    est = vramplan.estimate("llama-3.2-1b", "qlora", framework="litgpt", versions="bitsandbytes=0.42.0")
    b = band_for("litgpt", "qlora")
    assert est.extra["band"]["hi"] == b.hi and est.extra["band"]["rows"] == b.rows
    assert est.extra["band"]["low_bytes"] <= est.peak_bytes <= est.extra["band"]["high_bytes"]
    assert any(a.startswith("uncertainty band:") for a in est.assumptions)
    assert any("bitsandbytes 0.42.0 (given): bnb_4bit_saves_input applies" in a for a in est.assumptions)
    new = vramplan.estimate("llama-3.2-1b", "qlora", framework="litgpt", versions="bitsandbytes=0.44.0",
                            grad_ckpt=False)
    old = vramplan.estimate("llama-3.2-1b", "qlora", framework="litgpt", versions="bitsandbytes=0.42.0",
                            grad_ckpt=False)
    assert old.tensor_peak_bytes > new.tensor_peak_bytes  # the old MatMul4Bit keeps its inputs
    with pytest.raises(VramplanError, match="package=version"):
        vramplan.estimate("llama-3.2-1b", "qlora", versions="bitsandbytes")


def test_dropout_adds_masks_per_adapted_module():
    import vramplan

    kw = dict(batch=2, seq=512, grad_ckpt=False, targets="q_proj,v_proj")
    a = vramplan.estimate("llama-3.2-1b", "lora", **kw).tensor_peak_bytes
    b = vramplan.estimate("llama-3.2-1b", "lora", dropout=0.1, **kw).tensor_peak_bytes
    assert b > a
    with pytest.raises(VramplanError, match="dropout"):
        vramplan.estimate("llama-3.2-1b", "lora", dropout=1.5)


def test_config_read_back_from_json_keeps_hashable_versions():
    """A logged config (versions as JSON lists, or empty) rebuilds a hashable TrainConfig the
    calibration fit can plan (an unhashable list broke the cached behaviour lookup)."""
    from vramplan.config import TrainConfig

    for raw in ([], [["bitsandbytes", "0.42.0"]], {"bitsandbytes": "0.42.0"}):
        c = TrainConfig(versions=raw)
        hash(c)
        assert isinstance(c.versions, tuple)
        assert c.regime is not None


def test_dora_scaling_terms_do_not_depend_on_the_bitsandbytes_behaviour():
    """DoRA saves its magnitude-scaled base and LoRA results in every adapted module whatever the
    bitsandbytes version (a regression: they were once nested under the 4-bit branch)."""
    import vramplan
    from vramplan.models import get_model
    from vramplan.taxonomy import Component

    m = get_model("llama-3.2-1b")
    kw = dict(batch=1, seq=512, grad_ckpt=False, targets="q_proj,v_proj")
    acts = {meth: vramplan.estimate(m, meth, **kw).components[Component.ACTIVATIONS] for meth in ("lora", "dora")}
    q_out = next(l.out_features for l in m.layer_linears() if l.name == "q_proj")
    v_out = next(l.out_features for l in m.layer_linears() if l.name == "v_proj")
    assert acts["dora"] - acts["lora"] >= 512 * m.num_layers * (q_out + v_out) * 4


def test_an_unstated_optimizer_is_the_sources_documented_recipe(tmp_path):
    """sources.toml optimizer_unknown: the Unsloth README's examples set adamw_8bit, for both columns of its
    comparison; a source without one plans AdamW; a bad name is a one-line error."""
    from pathlib import Path

    extra = Path(CORPUS).parent / "published_extra.csv"
    recs = [r for r in import_csv(extra, load_mapping(SOURCES)) if r.source.id == "unsloth-README-context-length"]
    assert recs and {r.config.optimizer for r in recs} == {"adamw_8bit"}
    lf = [r for r in import_csv(CORPUS, load_mapping(SOURCES)) if r.source.id == "LLaMA-Factory-wiki-via-unsloth-README"]
    assert lf and {r.config.optimizer for r in lf} == {"adamw"}
    bad = tmp_path / "s.toml"
    bad.write_text('[source.x]\noptimizer_unknown = "lion"\n', encoding="utf-8")
    with pytest.raises(VramplanError, match="optimizer_unknown"):
        load_mapping(bad)
