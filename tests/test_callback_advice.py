"""The callback's "Try:" advice suggests the micro-batch ``fit`` would: its band-aware limit, not the raw one."""

from vramplan.gpus import get_gpu
from vramplan.integrations.hf import VramplanCallback
from vramplan.integrations.request import PlanRequest
from vramplan.models import get_model
from vramplan.plan import largest_batch
from vramplan.planner.limits import band_limits
from vramplan.verdict import Verdict


def _callback(model: str, method: str, batch: int, seq: int, gpu: str) -> VramplanCallback:
    cb = VramplanCallback(gpu=gpu)
    cb.request = PlanRequest(model=get_model(model), method=method, options=dict(batch=batch, seq=seq, grad_ckpt=True))
    cb._card = get_gpu(gpu)
    cb.estimate = cb._plan()
    return cb


def test_advice_batch_is_fits_comfortable_limit_not_the_raw_one():
    cb = _callback("llama-3.1-8b", "lora", 16, 512, "rtx4090")
    assert cb.estimate.verdict is Verdict.NO
    cfg, card = cb.estimate.config, get_gpu("rtx4090")
    lim = band_limits(cb.request.model, cfg, card)
    raw = largest_batch(cb.request.model, cfg, card)
    assert 0 < lim.max_batch < raw  # the case where the two differ
    advice = cb._advice()
    assert f"per_device_train_batch_size={lim.max_batch} " in advice and "tight" not in advice


def test_advice_falls_back_to_the_tight_batch_and_says_so():
    cb = _callback("qwen2.5-0.5b", "full", 64, 1024, "rtx3080")
    lim = band_limits(cb.request.model, cb.estimate.config, get_gpu("rtx3080"))
    assert lim.max_batch == 0 < lim.max_batch_tight
    assert f"per_device_train_batch_size={lim.max_batch_tight} (" in cb._advice() and "tight: may fit" in cb._advice()
