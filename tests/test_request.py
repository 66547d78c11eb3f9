"""Typed requests (vramplan.request): one object per question, built the same way by the CLI and the Python API."""

from __future__ import annotations

import dataclasses

import pytest

import vramplan
from vramplan.cli import build_parser, request_from_args
from vramplan.config import make_config
from vramplan.errors import VramplanError
from vramplan.gpus import get_gpu
from vramplan.matrix import feasibility_matrix, peak_grid
from vramplan.models import get_model
from vramplan.plan import fit_cards
from vramplan.planner.estimating import per_gpu_peak
from vramplan.planner.search import search, what_would_fit
from vramplan.request import (ConfigRequest, EstimateRequest, FitRequest, GridRequest, MatrixRequest, Request,
                              SearchRequest)

ONE_B = "llama-3.2-1b"


# -- keywords are checked against the declared fields ----------------------------------------------

@pytest.mark.parametrize("call, bad, near", [
    (lambda: vramplan.estimate(ONE_B, gpu="rtx4090", ranks=16), "ranks", "rank"),
    (lambda: vramplan.estimate(model=ONE_B, gpus_mem="24GiB"), "gpus_mem", "gpu_mem"),
    (lambda: vramplan.fit(ONE_B, "rtx4090", margn=0.2), "margn", "margin"),
    (lambda: fit_cards(ONE_B, method="lora"), "method", "methods"),
    (lambda: make_config(ONE_B, "lora", gradckpt=True), "gradckpt", "grad_ckpt"),
    (lambda: feasibility_matrix(ONE_B, "lora", "t4", batchs=2), "batchs", "batch"),
    (lambda: peak_grid(ONE_B, "lora", "t4", setting=None), "setting", "settings"),
    (lambda: search(get_model(ONE_B), "lora", get_gpu("t4"), seqs=512), "seqs", "seq"),
    (lambda: per_gpu_peak(ONE_B, "lora", gpus=2, strategey="zero3"), "strategey", "strategy"),
])
def test_an_unknown_keyword_is_a_vramplan_error_with_the_nearest_field(call, bad, near):
    with pytest.raises(VramplanError, match=f"no setting '{bad}'") as exc:
        call()
    assert exc.value.hint and near in exc.value.hint


def test_every_request_validates_its_fields_when_built():
    for build, needle in [(lambda: EstimateRequest(model=ONE_B, batch=0), "--batch"),
                          (lambda: EstimateRequest(model=ONE_B, gpus=0), "--gpus"),
                          (lambda: EstimateRequest(batch=2), "needs a model"),
                          (lambda: ConfigRequest(attn="xformers"), "attention"),
                          (lambda: ConfigRequest(method_options=[("num_generations", 4)]), "method_options"),
                          (lambda: FitRequest(model=ONE_B, margin=1.5), "--margin"),
                          (lambda: FitRequest(model=ONE_B, optimizer="lion"), "lion"),
                          (lambda: MatrixRequest(batch=2000), "at most 1,024"),
                          (lambda: MatrixRequest(precision="fp8"), "fp8"),
                          (lambda: SearchRequest(margin=1.0), "margin")]:
        with pytest.raises(VramplanError, match=needle):
            build()


def test_a_request_is_frozen_and_with_revalidates():
    req = EstimateRequest(model=ONE_B, gpu="rtx4090", batch=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.batch = 4  # type: ignore[misc]
    assert req.with_(batch=4).batch == 4 and req.batch == 2
    with pytest.raises(VramplanError, match="--batch"):
        req.with_(batch=-1)
    with pytest.raises(VramplanError, match="expected a FitRequest"):
        FitRequest.build(object())
    # a request of another kind carries the fields the two share
    fit_req = FitRequest.build(req, seq=1024)
    assert (fit_req.model, fit_req.gpu, fit_req.seq, fit_req.batch) == (ONE_B, "rtx4090", 1024, 2)


# -- the API accepts a request, and keywords build the same one ------------------------------------

def test_estimate_takes_a_request_or_its_keywords_alike():
    req = EstimateRequest(model=ONE_B, method="qlora", gpu="rtx4090", batch=4, seq=1024, global_batch=16)
    by_request = vramplan.estimate(req)
    by_keywords = vramplan.estimate(ONE_B, "qlora", gpu="rtx4090", batch=4, seq=1024, global_batch=16)
    assert by_request.to_json() == by_keywords.to_json()
    assert by_request.config.grad_accum == 4
    assert vramplan.estimate(req, batch=2).config.batch == 2  # a request with fields changed


def test_make_config_takes_a_request():
    req = ConfigRequest(method="dora", rank=16, seq=512, targets="all-linear")
    assert make_config(ONE_B, req) == make_config(ONE_B, "dora", rank=16, seq=512, targets="all-linear")
    assert make_config(ONE_B, req, rank=8).rank == 8


def test_fit_takes_a_request_or_its_keywords_alike():
    req = FitRequest(model=ONE_B, gpu="rtx4090", seq=1024, methods=["lora", "full"], advise=False)
    assert vramplan.fit(req).to_json() == vramplan.fit(ONE_B, "rtx4090", seq=1024, methods=["lora", "full"],
                                                        advise=False).to_json()
    assert FitRequest(model=ONE_B, methods="lora, full").methods == ["lora", "full"]


def _args(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("argv, expected", [
    (["estimate", "--model", ONE_B, "--gpu", "rtx4090", "--method", "grpo", "--num-generations", "4",
      "--global-batch", "8", "--batch", "2"],
     EstimateRequest(model=ONE_B, gpu="rtx4090", method="grpo", method_options={"num_generations": 4},
                     global_batch=8, batch=2)),
    (["fit", "--model", ONE_B, "--gpu", "t4", "--methods", "lora,grpo", "--num-generations", "4", "--seq", "1k"],
     FitRequest(model=ONE_B, gpu="t4", methods=["lora", "grpo"], method_options={"num_generations": 4}, seq=1024)),
    (["cards", "--model", ONE_B, "--methods", "grpo", "--num-generations", "4"],
     FitRequest(model=ONE_B, methods=["grpo"], method_options={"num_generations": 4})),
    (["matrix", "--models", ONE_B, "--gpus", "t4", "--methods", "grpo", "--num-generations", "4", "--rank", "16"],
     MatrixRequest(models=ONE_B, gpus="t4", methods="grpo", seqs="2048", rank=16,
                   method_options={"num_generations": 4})),
])
def test_the_cli_builds_the_request_the_api_builds(argv, expected):
    assert request_from_args(_args(argv)) == expected


# -- method options reach fit_cards and the matrix -------------------------------------------------

def test_matrix_cells_take_the_method_options():
    cards = "a100-80gb,rtx4090"
    base = feasibility_matrix(ONE_B, "grpo", cards, 1024)
    more = feasibility_matrix(MatrixRequest(models=ONE_B, methods="grpo", gpus=cards, seqs=1024,
                                            method_options={"num_generations": 32}))
    for b, m in zip(base.cells, more.cells):
        assert m.peak_bytes > b.peak_bytes  # 32 completions per prompt hold more than the default 8
        # each cell is estimate's figure for the same configuration, to the byte
        est = vramplan.estimate(ONE_B, "grpo", gpu=m.gpu, seq=1024, grad_ckpt=m.grad_ckpt, optimizer=m.optimizer,
                                method_options={"num_generations": 32})
        assert est.peak_bytes == m.peak_bytes
    # an option no method declares is refused, as estimate refuses it
    with pytest.raises(VramplanError, match="unknown method option"):
        feasibility_matrix(ONE_B, "grpo", "t4", method_options={"num_generation": 4})


def test_peak_grid_takes_the_method_options():
    kw = dict(models=ONE_B, methods="grpo", gpus="a100-80gb", seqs=(1024,), batches=(1,))
    base = peak_grid(GridRequest(**kw))
    more = peak_grid(GridRequest(**kw, method_options={"num_generations": 32}))
    assert float(more.peaks.max()) > float(base.peaks.max())


def test_fit_cards_take_the_method_options():
    cards = ["a100-80gb", "h100-sxm"]
    base = fit_cards(ONE_B, cards=cards, methods=["grpo"], seq=1024)
    more = fit_cards(FitRequest(model=ONE_B, methods=["grpo"], seq=1024, method_options={"num_generations": 32}),
                     cards=cards)
    assert {r.gpu for r in more.rows} == set(cards)
    one = {r.gpu: r for r in base.rows}
    for r in more.rows:
        assert r.row.estimate.config.option("num_generations") == 32
        assert one[r.gpu].row.estimate.config.option("num_generations") == 8
        # the row is fit's own on that card with the same options
        alone = vramplan.fit(ONE_B, r.gpu, methods=["grpo"], seq=1024, advise=False,
                             method_options={"num_generations": 32}).rows[0]
        assert alone.estimate.peak_bytes == r.row.estimate.peak_bytes


def test_what_would_fit_takes_a_search_request():
    spec, card = get_model("llama-2-13b"), get_gpu("rtx4090")
    req = SearchRequest(seq=4096)
    assert [s.to_json() for s in what_would_fit(spec, "full", card, req)] == \
        [s.to_json() for s in what_would_fit(spec, "full", card, seq=4096)]


def test_requests_are_exported():
    for name in ("ConfigRequest", "EstimateRequest", "FitRequest", "MatrixRequest", "GridRequest"):
        assert issubclass(getattr(vramplan, name), Request)


def test_each_shared_setting_has_one_home():
    """The stack, target, run and layout settings are declared once, in their field group, and every request that
    takes them inherits that group (same name, default and check)."""
    from vramplan import request as r

    groups = (r.StackFields, r.TargetFields, r.RunFields, r.LayoutFields)
    takes = {EstimateRequest: groups, FitRequest: groups, SearchRequest: (r.StackFields, r.RunFields),
             MatrixRequest: (r.StackFields,), GridRequest: (r.StackFields,), ConfigRequest: (r.StackFields,)}
    for cls, its_groups in takes.items():
        for group in its_groups:
            assert issubclass(cls, group), (cls, group)
            for name in vars(group)["__annotations__"]:
                homes = [c.__name__ for c in cls.__mro__ if name in vars(c).get("__annotations__", {})]
                assert homes == [group.__name__], (cls.__name__, name, homes)
    # a search request and a fit request fix or search the same settings, declared once
    assert issubclass(FitRequest, r.SearchedFields) and issubclass(SearchRequest, r.SearchedFields)
    assert FitRequest(model=ONE_B, rank=16).fixed == SearchRequest(rank=16).fixed
