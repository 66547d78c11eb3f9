"""``vramplan cards`` / ``fit --gpu all``: which card, by time and by cost, with sourced prices."""

from __future__ import annotations

import json

import pytest

import vramplan
from vramplan._data import load_data
from vramplan.cli import main
from vramplan.gpus import catalogue
from vramplan.plan import fit, fit_cards
from vramplan.prices import prices, sources


def test_price_table_is_sourced_and_dated():
    raw = load_data("prices.json")
    assert raw["currency"] == "USD" and raw["sources"]
    for s in sources().values():
        assert s["url"].startswith("https://") and len(s["date"]) == 10 and s["title"] and s["what"]
    for p in prices().values():
        assert p.gpu in catalogue()
        assert p.list_usd is not None or p.cloud_usd_per_hour is not None
        if p.list_usd is not None:
            assert p.list_source in sources() and "http" in p.source_text("list")
        if p.cloud_usd_per_hour is not None:
            assert p.cloud_source in sources() and "http" in p.source_text("cloud")


def test_every_card_that_fits_is_ranked_by_speed_and_cost():
    rep = fit_cards("3b", methods=["full"], tokens="100M")
    assert rep.rows and rep.no_fit
    assert {r.gpu for r in rep.rows} | set(rep.no_fit) == set(catalogue())
    tps = [r.tokens_per_s for r in rep.rows]
    assert tps == sorted(tps, reverse=True)
    for r in rep.rows:  # each row is what fit says on that card
        single = fit("3b", r.gpu, methods=["full"], tokens="100M", advise=False).rows[0]
        assert single.best is not None and single.tokens_per_s == pytest.approx(r.tokens_per_s)
        if r.price.cloud_usd_per_hour is not None:
            assert r.cost_usd == pytest.approx(r.price.cloud_usd_per_hour * single.gpu_hours)
    priced = [r.cost_usd for r in rep.by_cost if r.cost_usd is not None]
    assert priced == sorted(priced)
    assert [r for r in rep.by_cost if r.cost_usd is None] == rep.by_cost[len(priced):]


def test_cli_fit_gpu_all_and_cards_json(capsys):
    assert main(["fit", "--model", "1b", "--gpu", "all", "--methods", "qlora", "--json"]) == 0
    a = json.loads(capsys.readouterr().out)
    assert main(["cards", "--model", "1b", "--methods", "qlora", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert a["rows"] == b["rows"] and a["rows"][0]["recipe"] == "qlora"
    assert a["price_sources"] and all("cost_per_mtok_usd" in r for r in a["rows"])


def test_cards_refuses_several_gpus(capsys):
    assert main(["cards", "--model", "1b", "--gpus", "2"]) == 2
    assert "--gpu all" in capsys.readouterr().err


def test_progress_lines_when_piped(capsys, monkeypatch):
    import time

    from vramplan import render

    with render.ProgressBar("fast") as bar:  # done before FIRST_S: nothing said (a one-line error stays one line)
        bar(0, 2, "")
        bar(2, 2, "")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(render, "HEARTBEAT_S", 0.02)
    monkeypatch.setattr(render, "FIRST_S", 0.01)
    with render.ProgressBar("work", quiet_after=0.02) as bar:  # captured stderr is not a terminal
        for i in range(1, 4):
            time.sleep(0.02)
            bar(i, 4, "item")
    err = capsys.readouterr().err
    assert "work: 1/4" in err and "left)" in err
    with render.Elapsed("tracing"):
        time.sleep(0.1)
    err = capsys.readouterr().err
    assert err.startswith("tracing ...") and "still running" in err


def test_cards_that_cannot_run_the_request_are_skipped_and_bad_names_still_refused():
    """A card that cannot run what is asked (FlashAttention-2 before Ampere, bf16 on a T4) is left out of
    ``fit --gpu all`` as a card on which nothing fits (vramplan.errors.CardUnsupportedError, raised by
    check_card); until session 9 the T4 stopped the whole ranking with its error. A bad name is still an error."""
    from vramplan.errors import CardUnsupportedError, VramplanError
    from vramplan.gpus import get_gpu
    from vramplan.planner.checks import check_card

    with pytest.raises(CardUnsupportedError):
        check_card(None, "lora", None, "flash", get_gpu("t4"))
    with pytest.raises(CardUnsupportedError):
        check_card("bf16-mixed", "lora", None, "sdpa", get_gpu("t4"))
    rep = fit_cards("llama-3.2-1b", cards=["t4", "rtx4090"], attn="flash", methods=["lora"])
    assert [r.gpu for r in rep.rows] == ["rtx4090"] and rep.no_fit == ["t4"]
    assert rep.rows[0].row.settings["attn"] == "flash"
    with pytest.raises(VramplanError, match="unknown attention") as bad:
        fit_cards("llama-3.2-1b", cards=["t4"], attn="flsh", methods=["lora"])
    assert not isinstance(bad.value, CardUnsupportedError)


def test_what_would_fit_suggests_only_cards_that_run_the_plan(monkeypatch):
    """The smallest larger card what_would_fit suggests passes check_card (bf16, the attention kernel, 4-bit
    kernels: vramplan.planner.search._runs_on), not only the bf16 test it used to spell out: a Pascal card
    (compute capability 6.1, no bf16) with room to spare is passed over for a QLoRA plan in fp16."""
    from dataclasses import replace

    from vramplan.gpus import get_gpu
    from vramplan.models import get_model
    from vramplan.planner import search as search_mod

    spec, t4 = get_model("llama-2-13b"), get_gpu("t4")
    base = search_mod.what_would_fit(spec, "qlora", t4, precision="fp16-mixed", seq=4096)
    assert base and base[0].kind == "gpu"
    first = get_gpu(base[0].detail["gpu"])
    pascal = replace(first, name="pascal-test", compute_capability="6.1", bf16=False, flash_attention=False,
                     memory_bytes=first.memory_bytes - 1)  # sorts first among the larger cards
    cards = {**search_mod.catalogue(), "pascal-test": pascal}
    monkeypatch.setattr(search_mod, "catalogue", lambda: cards)
    assert not search_mod._runs_on(search_mod._frugal_cfg(spec, "qlora", search_mod.SearchRequest.build(
        precision="fp16-mixed", seq=4096)), pascal)
    assert search_mod.what_would_fit(spec, "qlora", t4, precision="fp16-mixed", seq=4096)[0].detail["gpu"] == first.name
