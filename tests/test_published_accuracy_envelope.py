"""Rows whose source leaves the LoRA configuration unknown are planned over the plausible configurations.

``vramplan/data/adapter_configs.toml`` lists them with their sources; a row with an unknown rank or
targets (``RunConfig.unstated``) takes the envelope's verdict on its OOM / fit-only outcome and, when
it has a number, a band widened by the configurations' spread; a row that states them does not.
"""

from __future__ import annotations

import pytest

from vramplan.errors import VramplanError
from vramplan.measurements import accuracy, plausible
from vramplan.measurements.importers import import_csv, load_mapping
from vramplan.measurements.plausible import envelope_verdict, parse_configs, plausible_configs
from vramplan.measurements.record import MeasurementRecord
from vramplan.verdict import classify

HEADER = "source,url_or_repo_path,model,method,lora_r,lora_targets,base_precision,micro_batch,seq_len,grad_ckpt,gpu,peak_mem_gib\n"


def _records(tmp_path, rows: str):
    path = tmp_path / "t.csv"
    path.write_text(HEADER + rows, encoding="utf-8")
    return import_csv(path, load_mapping(None))


def test_the_configurations_are_sourced_data():
    cfgs = plausible_configs()
    assert len(cfgs) >= 2 and cfgs[0].central and sum(c.central for c in cfgs) == 1
    assert all(c.source and c.rank >= 1 and 0.0 <= c.dropout < 1.0 for c in cfgs)
    # the central one is what the planner assumes when nothing is stated (PEFT's LoraConfig defaults)
    from vramplan.config import make_config

    cfg = make_config("llama-2-7b", "lora")
    assert (cfgs[0].rank, cfgs[0].targets, cfgs[0].dropout) == (cfg.rank, None, cfg.dropout)


@pytest.mark.parametrize("raw, says", [
    ({"a": {"rank": 8, "central": True}}, "names its source"),
    ({"a": {"rank": 8, "source": "x"}}, "exactly one configuration must be central"),
    ({"a": {"rank": 8, "source": "x", "central": True}, "b": {"rank": 16, "source": "y", "central": True}},
     "exactly one"),
    ({"a": {"rank": 0, "source": "x", "central": True}}, "rank must be a positive integer"),
    ({"a": {"rank": 8, "source": "x", "central": True, "targets": "most"}}, "targets must be"),
    ({"a": {"rank": 8, "source": "x", "central": True, "dropout": 1.5}}, "dropout must be"),
    ({"a": {"rank": 8, "source": "x", "central": True, "alpha": 16}}, "unknown field 'alpha'"),
])
def test_a_bad_configuration_file_is_one_clear_error(raw, says):
    with pytest.raises(VramplanError, match=says):
        parse_configs(raw)


@pytest.mark.parametrize("verdicts, want", [
    (["comfortable", "comfortable"], "comfortable"),
    (["comfortable", "tight"], "tight"),
    (["comfortable", "no"], "tight"),
    (["no", "no", "no"], "no"),
    (["tight", "no"], "tight"),
])
def test_the_envelope_is_comfortable_only_if_every_configuration_is(verdicts, want):
    assert envelope_verdict(verdicts) == want


def test_unknown_rank_and_targets_are_recorded_and_round_trip(tmp_path):
    recs = _records(tmp_path, "s,https://example.org/s,llama-2-13b,QLoRA,unknown,unknown,NF4 + fp16 compute,1,1024,on,1x T4,OOM\n"
                              "s,https://example.org/s,llama-2-13b,QLoRA,16,\"q,v\",NF4 + fp16 compute,1,1024,on,1x T4,OOM\n"
                              "s,https://example.org/s,llama-2-13b,full,n/a,n/a,bf16,1,1024,on,1x T4,OOM\n")
    assert recs[0].config.unstated == ("rank", "targets") and "plausible adapter configurations" in recs[0].notes
    assert recs[1].config.unstated == () and recs[2].config.unstated == ()  # stated; full training has no rank
    back = MeasurementRecord.from_dict(recs[0].to_dict())
    assert back == recs[0]
    d = recs[0].to_dict()
    d["config"]["unstated"] = ["alpha"]
    with pytest.raises(VramplanError, match="unstated may name"):
        MeasurementRecord.from_dict(d)


def test_a_row_with_unknown_rank_takes_the_envelope_verdict(tmp_path):
    unknown, known = _records(tmp_path, "s,https://example.org/s,llama-2-13b,QLoRA,unknown,unknown,NF4 + fp16 compute,1,1024,on,1x T4,OOM\n"
                                        "s,https://example.org/s,llama-2-13b,QLoRA,8,\"q,v\",NF4 + fp16 compute,1,1024,on,1x T4,OOM\n")
    u, k = accuracy.score_one(unknown), accuracy.score_one(known)
    assert [n for n, _, _ in u.envelope] == [c.name for c in plausible_configs()]
    # the central prediction is PEFT's defaults: the same plan as the row that states r=8 on q/v
    assert u.device == k.device and u.envelope[0][2] == u.device
    devices = {n: d for n, _, d in u.envelope}
    assert devices["qlora-paper"] > devices["peft-defaults"]  # r=64 on every linear layer holds more
    for band in (None, (-0.2, 0.3)):
        u.band = k.band = band
        lo, hi = band or (0.0, 0.0)
        assert u.verdict == envelope_verdict(classify(d, u.capacity, hi, lo).value for d in devices.values())
        assert u.central_verdict == k.verdict == k.central_verdict
    assert k.envelope == ()
    # a capacity between the smallest and the largest configuration: tight, whatever the central one says
    u.band, u.capacity = None, int(devices["peft-defaults"] / 0.80)
    assert u.central_verdict == "comfortable" and u.verdict == "tight"


def test_the_envelope_members_come_from_the_data(tmp_path, monkeypatch):
    cfgs = parse_configs({"mine": {"rank": 8, "source": "s", "central": True},
                          "wide": {"rank": 128, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "source": "t"}})
    monkeypatch.setattr(accuracy, "plausible_configs", lambda: cfgs)
    monkeypatch.setattr(accuracy, "central_config", lambda: cfgs[0])
    (rec,) = _records(tmp_path, "s,https://example.org/s,llama-2-7b,LoRA,unknown,\"q,v\",bf16,1,512,on,1x RTX 4090,14.0\n")
    assert rec.config.unstated == ("rank",)
    s = accuracy.score_one(rec)
    assert [n for n, _, _ in s.envelope] == ["mine", "wide"]
    # only the rank is unknown: "wide" keeps the row's q/v targets, so it differs from "mine" by the rank alone
    est = accuracy.plan(rec, cfgs[1])
    assert est.config.rank == 128 and s.envelope[1][2] == int(est.peak_bytes)


def test_a_scored_row_band_is_widened_by_the_spread(tmp_path):
    (rec,) = _records(tmp_path, "s,https://example.org/s,llama-2-7b,QLoRA,unknown,unknown,bf16,1,1024,on,1x RTX 4090,9.0\n")
    s = accuracy.score_one(rec)
    assert s.status == "scored" and len(s.envelope) == len(plausible_configs())
    lo_sp, hi_sp = s.envelope_spread
    assert lo_sp <= 0.0 < hi_sp
    s.band, s.band_from = (-0.1, 0.1), "stack (3 rows of other sources)"
    accuracy.widen_by_envelope([s])
    assert s.band == pytest.approx(((1 + lo_sp) * 0.9 - 1, (1 + hi_sp) * 1.1 - 1))
    assert "widened" in s.band_from
    # the error stays the central prediction's
    assert s.predicted == s.envelope[0][1]


def test_corpus_rows_that_leave_the_rank_unknown_are_planned_over_the_envelope():
    from conftest import load_benchmark

    bench = load_benchmark("published_accuracy")
    recs = bench.load_corpus()
    judged = [accuracy.score_one(r) for r in recs if r.config.unstated and r.config.model]
    assert judged and any(s.status == "oom" for s in judged)
    for s in judged:
        if s.status in ("scored", "oom", "fit_only"):
            assert [n for n, _, _ in s.envelope] == [c.name for c in plausible.plausible_configs()]
