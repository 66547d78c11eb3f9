"""Feasibility matrix: agreement with estimate/fit, verdict thresholds, speed, writers, CLI."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import vramplan
from vramplan.cli import main
from vramplan.errors import VramplanError
from vramplan.gpus import get_gpu
from vramplan.matrix import (SETTINGS_LADDER, feasibility_matrix, peak_grid, select_gpus, select_methods,
                             write_csv, write_html, write_markdown, write_reports)
from vramplan.models import catalogue as model_catalogue
from vramplan.gpus import catalogue as gpu_catalogue
from vramplan.methods import default_methods
from vramplan.plan import largest_batch
from vramplan.verdict import COMFORTABLE_FRACTION, Verdict, classify, classify_array, pick

SMALL = dict(models="1b,7b,13b", methods="full,lora,qlora,ia3,dpo,dpo+qlora,ppo", gpus="rtx3080,rtx4000ada,t4,h100")


@pytest.fixture(scope="module")
def small():
    return feasibility_matrix(**SMALL, seqs=[512, 2048])


# -- verdicts -------------------------------------------------------------------------------

def test_verdict_thresholds_at_the_boundaries():
    cap = 10 * 2**30
    assert classify(COMFORTABLE_FRACTION * cap, cap) is Verdict.COMFORTABLE
    assert classify(COMFORTABLE_FRACTION * cap + 1, cap) is Verdict.TIGHT
    assert classify(cap, cap) is Verdict.TIGHT  # equal to the capacity still fits, as Estimate.fits says
    assert classify(cap + 1, cap) is Verdict.NO
    assert list(classify_array([1, 0.9 * cap, 2 * cap], cap)) == [0, 1, 2]
    assert Verdict.NO.fits is False and Verdict.TIGHT.fits


def test_pick_prefers_comfortable_then_fits_then_smallest():
    cap = 100.0
    assert pick([95, 90, 50, 40], cap) == 2      # first comfortable, not the smallest
    assert pick([120, 95, 90], cap) == 1         # none comfortable: first that fits
    assert pick([300, 150, 200], cap) == 1       # none fits: the smallest peak
    assert list(pick(np.array([[95, 300], [50, 200]]), cap)) == [1, 1]  # vectorised over columns


def test_no_only_when_the_band_lower_end_exceeds_the_card(small):
    """Two-sided verdict: "no" exactly when even peak x (1 + lo) exceeds the card; a cell over the card by
    less than that is "tight" (it may fit), never "no"; "comfortable" only with the band's upper end under it."""
    from vramplan.bands import band_for
    from vramplan.matrix import cell_text

    assert small.framework == "hf"
    for c in small.cells:
        if c.peak_bytes is None:
            continue
        b = band_for("hf", c.method)  # cells name the recipe as bands key it: lora, qlora, dpo+lora
        assert (c.verdict is Verdict.NO) == (c.peak_bytes * (1 + b.lo) > c.capacity_bytes), c
        if c.verdict is Verdict.COMFORTABLE:
            assert c.peak_bytes * (1 + b.hi) <= c.capacity_bytes
        if c.peak_bytes > c.capacity_bytes and c.verdict is Verdict.TIGHT:
            assert c.max_batch == 0 and "likely over" in cell_text(c)


# -- agreement with the scalar path ---------------------------------------------------------

def test_cells_match_estimate_and_largest_batch(small):
    """Every cell: the same peak as estimate() to the byte, verdict, and largest_batch()."""
    for c in small.cells:
        if c.peak_bytes is None:
            continue
        method, _, adapter = c.method.partition("+")
        est = vramplan.estimate(c.model, method, adapter=adapter or None, gpu=c.gpu, seq=c.seq, batch=c.batch,
                                grad_ckpt=c.grad_ckpt, optimizer=c.optimizer)
        assert est.config.precision == c.precision
        assert est.peak_bytes == c.peak_bytes, c
        assert est.tensor_peak_bytes == c.tensor_peak_bytes
        from vramplan.bands import band_for_config

        b = band_for_config(est.config)
        assert classify(est.peak_bytes, est.capacity_bytes, b.hi, b.lo) is c.verdict is est.verdict
        assert largest_batch(vramplan.get_model(c.model), est.config, get_gpu(c.gpu)) == c.max_batch, c


def test_fp16_cards_are_planned_in_fp16_mixed(small):
    assert {c.precision for c in small.cells if c.gpu == "t4"} == {"fp16-mixed"}
    assert {c.precision for c in small.cells if c.gpu == "rtx3080"} == {"bf16-mixed"}


@pytest.mark.parametrize("model,gpu", [("7b", "rtx4000ada"), ("1b", "rtx3080"), ("13b", "rtx4000ada")])
def test_matrix_verdicts_agree_with_fit(model, gpu):
    """With the same search space (batch 1, rank 8, PEFT targets, sdpa), fit and matrix give the same verdict.

    fit ranks by speed (it may pick another setting), and may fall back to QLoRA; the verdict
    -- comfortable / tight / no -- must not differ for the method itself.
    """
    rep = vramplan.fit(model, gpu, batch=1, rank=8, targets="q_proj,v_proj", attn="sdpa")
    mx = feasibility_matrix(model, "all", gpu, 2048)
    compared = 0
    for row in rep.rows:
        if (row.chosen is not None and row.chosen.fallback) or row.adapter in ("ia3", "qia3"):
            continue  # a 4-bit fallback is another method; fit's fixed targets would change IA3's
        c = mx.cell(model, row.method, gpu)
        assert row.verdict is c.verdict, (row.method, row.estimate.peak_bytes, c)
        assert row.to_json()["verdict"] == c.verdict.value
        if (row.settings["grad_ckpt"], row.settings["optimizer"]) == (c.grad_ckpt, c.optimizer):
            assert row.estimate.peak_bytes == c.peak_bytes
        compared += 1
    assert compared >= 2  # (LoRA and DoRA may both fall back to their 4-bit twins)


def test_monotone_in_card_memory_and_sequence(small):
    order = {v: i for i, v in enumerate((Verdict.COMFORTABLE, Verdict.TIGHT, Verdict.NO))}
    for m in small.models:
        for meth in small.methods:
            a = small.cell(m, meth, "rtx3080", 2048)
            b = small.cell(m, meth, "rtx4000ada", 2048)
            assert order[b.verdict] <= order[a.verdict] and b.max_batch >= a.max_batch
            short = small.cell(m, meth, "rtx4000ada", 512)
            assert order[short.verdict] <= order[b.verdict]
            if (short.grad_ckpt, short.optimizer) == (b.grad_ckpt, b.optimizer):  # same settings: more room
                assert short.max_batch >= b.max_batch


def test_capacities_and_dpo_adapters_select():
    cards = select_gpus("rtx3080,24GiB")
    assert cards[1].memory_bytes == 24 * 2**30 and cards[1].custom
    assert [r.name for r in select_methods("dpo+qlora,ppo")] == ["dpo+qlora", "ppo+lora"]
    with pytest.raises(VramplanError):
        select_gpus("rtx9999")
    with pytest.raises(VramplanError):
        feasibility_matrix("7b", "lora", "rtx3080", [0])
    with pytest.raises(VramplanError):
        feasibility_matrix("7b", "lora", "rtx3080", 2048, batch=0)


def test_unsupported_feature_on_a_card_is_a_no_with_a_note():
    mx = feasibility_matrix("1b", "lora", "t4,rtx3080", 2048, attn="flash")
    t4 = mx.cell("1b", "lora", "t4")
    assert t4.verdict is Verdict.NO and t4.peak_bytes is None and "FlashAttention" in t4.note
    assert mx.cell("1b", "lora", "rtx3080").peak_bytes is not None


# -- speed ----------------------------------------------------------------------------------

def test_whole_catalogue_grid_is_vectorised():
    # its speed (target 2 s on a 2-core CPU) is benchmarks/matrix_speed.py's figure: no wall clock in a test
    g = peak_grid()  # every model x method x card x 5 seqs x 8 batches
    assert g.peaks.shape == (len(model_catalogue()), len(default_methods()), 1, len(gpu_catalogue()), 5, 8)
    assert g.configurations == len(model_catalogue()) * len(default_methods()) * len(gpu_catalogue()) * 40
    assert np.isfinite(g.peaks).all()
    # batch-monotone, and the grid agrees with the matrix at batch 1
    assert (np.diff(g.peaks, axis=-1) >= 0).all()


def test_grid_agrees_with_estimate_on_a_sample():
    g = peak_grid("7b,1b", "qlora,dpo", "rtx3080,t4", [1024, 2048], [1, 4], settings=SETTINGS_LADDER)
    rng = np.random.default_rng(0)
    for _ in range(12):
        i, j, k, gi, si, bi = (int(rng.integers(n)) for n in g.peaks.shape)
        gc, opt = g.settings[k]
        est = vramplan.estimate(g.models[i], g.methods[j].split("+")[0], gpu=g.gpus[gi], seq=g.seqs[si],
                                batch=g.batches[bi], grad_ckpt=gc, optimizer=opt)
        assert est.peak_bytes == g.peaks[i, j, k, gi, si, bi]


# -- writers --------------------------------------------------------------------------------

def test_markdown_has_one_table_per_card_and_seq(small):
    buf = io.StringIO()
    write_markdown(small, buf)
    text = buf.getvalue()
    assert "85%" in text and text.count("| model |") == len(small.gpus) * len(small.seqs)
    assert "| llama-2-7b |" in text


def test_csv_is_one_row_per_cell(small):
    buf = io.StringIO()
    write_csv(small, buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(rows) == len(small.cells)
    assert {"model", "method", "gpu", "seq", "verdict", "peak_gib", "max_batch", "grad_ckpt", "optimizer"} <= set(rows[0])
    assert {r["verdict"] for r in rows} <= {"comfortable", "tight", "no"}


def test_html_is_self_contained(small):
    buf = io.StringIO()
    write_html(small, buf)
    page = buf.getvalue()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and page.rstrip().endswith("</html>")
    assert "src=" not in page and "<link" not in page and "<script" not in page


def test_png_heat_map(tmp_path, small):
    pytest.importorskip("matplotlib")
    paths = write_reports(small, tmp_path, "png")
    data = paths[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_import_of_matrix_stays_light():
    code = ("import sys, vramplan, vramplan.matrix, vramplan.verdict; "
            "print(','.join(m for m in ('pandas', 'matplotlib', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# -- CLI ------------------------------------------------------------------------------------

def test_cli_matrix_json(capsys):
    assert main(["matrix", "--models", "7b", "--methods", "qlora,lora", "--gpus", "rtx3080", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["cells"]) == 2 and d["comfortable_fraction"] == COMFORTABLE_FRACTION


def test_cli_matrix_writes_every_format(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(["matrix", "--models", "1b,7b", "--methods", "lora,qlora", "--gpus", "rtx3080,rtx4000ada",
               "--seq", "1024,2048", "--out", str(tmp_path), "--format", "md,csv,html,png", "--name", "m"])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.csv", "m.html", "m.md", "m.png"]


@pytest.mark.parametrize("argv", [
    ["matrix", "--gpus", "rtx9999"],
    ["matrix", "--models", "7b", "--seq", "0"],
    ["matrix", "--models", "7b", "--format", "pdf", "--out", "x"],
    ["matrix", "--models", "7b", "--format", "png"],
    ["matrix", "--models", "7b", "--methods", "dpo+bogus"],
])
def test_cli_matrix_bad_input_is_one_line_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vramplan: error:") and "\n" not in err


# -- the written comparison in reports/feasibility.md ------------------------------------------

REPORT = __import__("pathlib").Path(__file__).resolve().parent.parent / "reports" / "feasibility.md"
REGENERATE = ("regenerate it: vramplan matrix --models 1b,3b,7b,mistral-7b,8b,13b --methods "
              "full,lora,qlora,dora,ia3,dpo,dpo+qlora,ppo --gpus rtx3080,rtx4000ada --seq 512,1024,2048 "
              "--out reports --preamble reports/feasibility_comparison.md (and update the written comparison)")


def _report_rows():
    import re

    if not REPORT.exists():
        return []
    pat = re.compile(r"^\|[^|]*\|[^|]*\| `([^`]+)` · `([^`]+)` · `([^`]+)` · (\d+)(?: · `([^`]+)`)? \| ([^|]+) \|")
    return [m.groups() for line in REPORT.read_text(encoding="utf-8").splitlines() if (m := pat.match(line))]


def test_report_comparison_still_holds():
    """Each row of the rules-of-thumb comparison says what the planner says today."""
    from vramplan.matrix import cell_text

    rows = _report_rows()
    assert len(rows) >= 20, f"no comparison table found in {REPORT}"
    for model, method, gpu, seq, options, said in rows:
        opts = {}
        toks = (options or "").split()
        for flag, value in zip(toks[::2], toks[1::2]):
            opts[flag.lstrip("-").replace("-", "_")] = int(value) if value.isdigit() else value
        c = feasibility_matrix(model, method, gpu, int(seq), **opts).cells[0]
        assert cell_text(c) == said.strip(), f"{model} {method} {gpu} {seq} {options}: planner now says " \
                                             f"{cell_text(c)!r}; {REGENERATE}"


def test_report_tables_match_the_matrix():
    from vramplan.matrix import cell_text

    text = REPORT.read_text(encoding="utf-8")
    mx = feasibility_matrix("1b,3b,7b,mistral-7b,8b,13b", "full,lora,qlora,dora,ia3,dpo,dpo+qlora,ppo",
                            "rtx3080,rtx4000ada", [512, 1024, 2048])
    missing = [c for c in mx.cells if f" {cell_text(c)} |" not in text]
    assert not missing, f"{len(missing)} cells differ, e.g. {missing[0]}; {REGENERATE}"
    for ext in ("csv", "html", "png"):
        assert REPORT.with_suffix("." + ext).exists()


def test_png_is_split_per_card_when_large(tmp_path):
    pytest.importorskip("matplotlib")
    from vramplan.matrix import MAX_PANELS_PER_PNG, png_paths

    mx = feasibility_matrix("1b", "lora", "rtx3080,rtx4090,l4,a100-80gb", [1024, 2048])
    assert len(mx.gpus) * len(mx.seqs) > MAX_PANELS_PER_PNG
    seen = []
    paths = write_reports(mx, tmp_path, "png", "m", progress=lambda d, t, item: seen.append((d, t)))
    assert [p.name for p in paths] == [f"m-{g}.png" for g in ("rtx3080", "rtx4090", "l4", "a100-80gb")]
    assert [p for p, _ in png_paths(mx, tmp_path / "m.png")] == paths
    assert seen[-1] == (4, 4) and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert not list(tmp_path.glob("*.tmp"))


def test_matrix_reports_progress():
    seen = []
    feasibility_matrix("1b,7b", "lora,qlora", "rtx3080", 1024, progress=lambda d, t, item: seen.append((d, t)))
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)
