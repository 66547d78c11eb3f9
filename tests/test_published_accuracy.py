"""The published-accuracy benchmark's core on the shipped corpus: its accounting, not its targets.

The accuracy figures (median error, bands, OOM verdicts) are printed by
``benchmarks/published_accuracy.py``; here: every row is accounted for exactly once, each scored
row is compared on its own quantity, bands are leave-one-source-out, estimates never enter a band,
and the shipped bands file is the one the corpus gives.
"""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark

from vramplan.measurements.accuracy import LIKE_FOR_LIKE, fit_bands, summarize

bench = load_benchmark("published_accuracy")


@pytest.fixture(scope="module")
def scored():
    return bench.run()


def test_every_row_is_accounted_for_once(scored):
    s = summarize(scored)
    assert s.rows == len(scored) >= 149
    assert s.scored + s.oom + s.fit_only + s.estimated + s.inconsistent + s.skipped == s.rows
    assert sum(s.skip_reasons.values()) == s.skipped
    assert all(x.reason for x in scored if x.status in ("skipped", "inconsistent"))
    assert s.estimated == sum(x.record.estimated for x in scored) == 12
    assert s.scored >= 50 and s.oom >= 5 and s.fit_only >= 3


def test_scored_rows_use_the_quantity_their_source_printed(scored):
    for x in scored:
        if x.status != "scored":
            continue
        if x.quantity == "unknown_peak":
            assert x.allocated <= x.predicted <= x.reserved
            assert x.predicted == x.measured or x.predicted in (x.allocated, x.reserved)
        else:
            want = {"allocated": x.allocated, "reserved": x.reserved, "device": x.device}[LIKE_FOR_LIKE[x.quantity]]
            assert x.predicted == want
        assert x.allocated <= x.reserved <= x.device


def test_bands_leave_the_row_source_out(scored):
    from vramplan.measurements.accuracy import _band_of, _key

    for x in scored:
        if x.band is None:
            continue
        level = x.band_from.split(" ")[0]
        others = [o.ratio for o in scored if o.status == "scored" and o.ratio is not None and o.source != x.source
                  and _key(level, o) == _key(level, x)]
        lo, hi = _band_of(others)
        if "widened" in x.band_from:  # a row whose adapter settings are unstated: widened by their spread
            sp = x.envelope_spread
            lo, hi = (1 + sp[0]) * (1 + lo) - 1, (1 + sp[1]) * (1 + hi) - 1
        assert x.band == (lo, hi)


def test_estimates_are_compared_but_never_fitted(scored):
    est = [x for x in scored if x.record.estimated]
    assert est and all(x.status == "estimated" for x in est)
    fitted = fit_bands([x for x in scored if not x.record.estimated])
    assert fit_bands(scored) == fitted


def test_shipped_bands_are_the_corpus_bands(scored):
    shipped = json.loads(bench.BANDS.read_text())["bands"]
    assert shipped == json.loads(json.dumps(fit_bands(scored)))


def test_report_names_every_stack_and_its_rows(scored):
    text = bench.report(scored)
    for stack in {x.stack for x in scored if x.status == "scored"}:
        assert f"| {stack} |" in text
    assert "Headline (leave-one-source-out)" in text and "Mechanisms" in text


def test_allocator_reserve_is_fitted_leave_one_source_out(scored):
    """The shipped default reserve is the fraction the corpus fits; each source was scored with the fraction
    fitted on the others (vramplan.measurements.accuracy.score_reserve_loso)."""
    from vramplan.measurements.accuracy import RESERVE_GRID, reserve_evidence
    from vramplan.overheads import DEFAULT_RESERVE_FRACTION

    fit = bench.RESERVE_FIT
    assert fit["all"] == DEFAULT_RESERVE_FRACTION
    assert set(fit["fits"]) == {s.source for s in scored}
    assert set(fit["fits"].values()) <= set(RESERVE_GRID)
    # the evidence: reserved / device-total rows and the published context capacities, nothing allocated
    ev = reserve_evidence(scored)
    n = sum(s.status == "scored" and s.quantity in ("max_reserved", "device_total") for s in scored)
    assert len(ev) == n + sum(s.capacity_error is not None for s in scored) and n > 0


# -- a table kept aside, as a third party writes it ----------------------------------------------------

HELD_OUT = """\
source,url_or_repo_path,model,method,lora_r,micro_batch,seq_len,grad_ckpt,gpu,peak_mem_gib,quantity,unit,reviewer
blog-a,https://example.org/a,meta-llama/Llama-2-7b-hf,QLoRA,16,4,<=512,on,1x A100 80GB,12.1 gb,max_memory_allocated,,x
blog-a,https://example.org/a,Llama-2-7b,LoRA,16,4,512,off,1x A100 80GB,"18,432",nvidia-smi,MiB,x
issue-b,https://example.org/b,llama-2-13b,LoRA,8,1,1024,on,1x RTX 4090,OOM,,,y
issue-b,https://example.org/b,llama-2-7b,qlora,8,1,1024,on,1x T4,fits (no number),,,y
issue-b,https://example.org/b,llama-2-7b,qlora,8,1,1024,on,1x T4,<= 15 GB,reserved,,y
issue-b,https://example.org/b,llama-2-7b,qlora,8,1,1024,on,1x T4,~9.5 GiB,reserved,,y
issue-b,https://example.org/b,llama-2-7b,qlora,8,1,1024,on,1x T4,9.5,torch peak of some kind,,y
issue-b,https://example.org/b,a-model-nobody-catalogued-3b,LoRA,8,1,1024,on,1x T4,9.5,,,y
"""


def test_a_held_out_table_is_read_tolerantly(tmp_path):
    from vramplan.measurements.importers import import_csv, load_mapping

    path = tmp_path / "held.csv"
    path.write_text(HELD_OUT, encoding="utf-8")
    recs = import_csv(path, load_mapping(bench.SOURCES))
    m = [r.measurement for r in recs]
    assert [x.outcome for x in m] == ["measured", "measured", "oom", "fit_only", "fit_only", "measured", "measured",
                                      "measured"]
    assert m[0].bytes == 12_100_000_000 and m[0].quantity == "max_allocated"     # "gb" in the cell, any case
    assert m[1].bytes == 18_432 * 2**20 and m[1].quantity == "device_total"      # per-row unit, thousands separator
    assert m[2].quantity == m[3].quantity == "unknown_peak"                      # unknown source: a peak of unknown kind
    assert m[5].bytes == round(9.5 * 2**30) and m[5].quantity == "max_reserved"  # "~": approximate, GiB in the cell
    assert m[6].quantity == "unknown_peak" and "not recognised" in recs[6].notes
    assert recs[0].config.seq == 512 and recs[0].config.seq_bound == "max"
    assert recs[0].config.model == "llama-2-7b" and recs[7].config.model is None


def test_a_held_out_table_is_scored_with_the_shipped_reserve_and_bands(tmp_path, capsys):
    from vramplan.bands import band_for

    path = tmp_path / "held.csv"
    path.write_text(HELD_OUT, encoding="utf-8")
    scored = bench.run_held_out(bench.load_corpus([path], bench.SOURCES))
    s = summarize(scored)
    assert s.rows == 8 and s.oom == 1 and s.fit_only == 2 and s.skip_reasons == {"model not in the catalogue": 1}
    assert s.scored == 4
    for row in scored:
        if row.status == "scored":  # the band a user is shown, not one fitted on the held-out rows
            b = band_for(row.stack, row.method)
            assert row.band_from.startswith("shipped")
            if row.record.config.unstated:  # no targets column: the band covers the plausible configurations too
                sp = row.envelope_spread
                assert row.band == ((1 + sp[0]) * (1 + b.lo) - 1, (1 + sp[1]) * (1 + b.hi) - 1)
            else:
                assert row.band == (b.lo, b.hi)
    assert bench.main(["--csv", str(path), "--no-report", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"]["rows"] == 8


@pytest.mark.parametrize("table, says", [
    ("model,method,peak_mem_gib\nllama-2-7b,LoRA,lots\n", "cannot read a memory figure"),
    ("model,peak_mem_gib\nllama-2-7b,12\n", "no column 'method'"),
    ("", "no column"),
])
def test_a_bad_held_out_table_is_one_line_and_exit_2(tmp_path, capsys, table, says):
    path = tmp_path / "bad.csv"
    path.write_text(table, encoding="utf-8")
    assert bench.main(["--csv", str(path), "--no-report"]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and "Traceback" not in err
    assert bench.main(["--csv", str(tmp_path / "absent.csv"), "--no-report"]) == 2
    assert bench.main(["--csv", str(path), "--sources", str(tmp_path / "absent.toml"), "--no-report"]) == 2
