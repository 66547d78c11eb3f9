"""Corpus readings (issue 12): each from the source's own code at its commit."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramplan.errors import VramplanError
from vramplan.measurements.accuracy import plan
from vramplan.measurements.importers import import_csv, load_mapping
from vramplan.measurements.record import SCHEMA, MeasurementRecord
from vramplan.taxonomy import Component

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "measurements" / "published.csv"
SOURCES = ROOT / "measurements" / "sources.toml"


def _rec(config: dict) -> dict:
    return {"schema": SCHEMA,
            "config": {"model": "llama-2-7b", "method": "lora", "adapter": "lora", "batch": 2, "seq": 512,
                       "stack": "hf", "gpus": 1, "strategy": "zero3", "offload": "cpu", "optimizer": "adamw",
                       "grad_ckpt": False, **config},
            "device": {"name": "a100-80gb"},
            "measurement": {"outcome": "measured", "quantity": "max_allocated", "bytes": 10 * 2**30},
            "source": {"kind": "published", "id": "x", "ref": "owner/repo:README.md @abc"}}


def test_engine_options_round_trip_and_validation():
    r = MeasurementRecord.from_dict(_rec({"engine_options": {"reduce_bucket_size": 500_000_000}}))
    assert r.config.engine_options == {"reduce_bucket_size": 500_000_000}
    assert MeasurementRecord.from_dict(r.to_dict()).to_dict() == r.to_dict()
    assert MeasurementRecord.from_dict(_rec({})).config.engine_options == {}
    for bad in ({"reduce_bucket_size": -1}, {"reduce_bucket_size": "big"}, [1]):
        with pytest.raises(VramplanError, match="engine_options"):
            MeasurementRecord.from_dict(_rec({"engine_options": bad}))


def test_an_unknown_engine_option_is_a_plan_error_not_a_crash():
    r = MeasurementRecord.from_dict(_rec({"engine_options": {"bucket_of_water": 3}}))
    with pytest.raises(VramplanError, match="engine option"):
        plan(r)


def test_peft_readme_zero3_offload_rows_plan_deepspeeds_default_reduce_bucket():
    """accelerate's yaml-built DeepSpeed config (07e2e712) leaves reduce_bucket_size unset: DeepSpeed's 5e8-element
    contiguous-gradients bucket, fp32 here, sits on the GPU from engine init (the README's T0_3B log: 1916 MiB before
    training with every parameter offloaded)."""
    recs = [r for r in import_csv(CORPUS, load_mapping(SOURCES)) if r.source.id == "peft-README"]
    off = [r for r in recs if r.config.strategy == "zero3" and r.config.model == "bloomz-7b1"]
    plain = [r for r in recs if r.config.strategy is None and r.config.model == "bloomz-7b1"]
    assert off and plain and all(r.config.engine_options == {"reduce_bucket_size": 500_000_000} for r in off)
    assert all(r.config.engine_options == {} for r in plain)
    est = plan(off[0])
    assert est.components[Component.REDUCE_BUFFERS] == 4 * 500_000_000


def test_ms_swift_example_rows_carry_their_scripts_settings():
    """The ms-swift example rows: settings as their scripts state them, the stack's documented defaults otherwise."""
    recs = {(r.source.id, r.config.model, r.config.method): r for r in import_csv(ROOT / "measurements" /
            "published_extra.csv", load_mapping(SOURCES)) if r.source.id.startswith("ms-swift-examples")}
    dpo = recs[("ms-swift-examples-v3", "qwen2.5-7b", "dpo")].config
    assert (dpo.adapter, dpo.rank, dpo.targets, dpo.batch, dpo.seq, dpo.seq_bound, dpo.grad_ckpt, dpo.dropout,
            dpo.precision) == ("lora", 8, ("all-linear",), 1, 2048, "max", True, 0.05, "bf16-mixed")
    full = recs[("ms-swift-examples-v3", "qwen2.5-3b", "full")].config
    assert (full.precision, full.seq, full.packing, full.attn, full.techniques) == ("bf16", 8192, True, "flash",
                                                                                    ("liger_ce",))
    mistral = recs[("ms-swift-examples-v2", "mistral-7b-v0.2", "lora")].config
    assert mistral.targets == ("q_proj", "k_proj", "v_proj") and mistral.attn == "flash"
    yi_q = recs[("ms-swift-examples-v2", "yi-34b", "qlora")]
    assert yi_q.config.double_quant is True and yi_q.config.attn == "eager"
    assert yi_q.device.versions["bitsandbytes"] < "0.43.2"
    assert recs[("ms-swift-examples-v2", "llama-3-8b", "lora")].config.attn == "sdpa"


def test_ms_swift_script_reader_takes_the_command_arguments():
    import importlib.util

    spec = importlib.util.spec_from_file_location("msr", ROOT / "measurements" / "scripts" / "ms_swift_script_rows.py")
    msr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(msr)
    text = "# 20GB GPU memory\nCUDA_VISIBLE_DEVICES=0 \\\nswift sft \\\n    --lora_target_modules ALL \\\n" \
           "    --max_length 2048 \\\n    --system 'You are a helper.' \\\n    --batch_size 1\n"
    a = msr.script_args(text)
    assert a == {"lora_target_modules": "ALL", "max_length": "2048", "system": "'You are a helper.'", "batch_size": "1"}
