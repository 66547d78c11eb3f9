"""Predicted vs published tokens/s, and vs a card's calibration points once a profile exists.

    python benchmarks/throughput_vs_published.py          # tables
    python benchmarks/throughput_vs_published.py --json   # one JSON object

Published single-GPU figures are few; the ones used here, with what they measured:

* torchtune README, "Memory and training speed" (pytorch/torchtune, README.md, 2025): Llama 3.1
  8B, batch 2, dataset packed to 2048 tokens, torch.compile on, tokens/s over one epoch.
  Recipes (the repository's configs): full = ``8B_full_single_device`` (bf16, PagedAdamW8bit,
  optimizer in backward, activation checkpointing); LoRA/QLoRA = ``8B_(q)lora_single_device``
  (rank 8, q/v/output projections + MLP, activation checkpointing).
* torchtune README, "Optimization flags": Llama 3.2 3B, full fine-tune on one A100, batch 2,
  max sequence 4096, bf16; each technique added to the previous row. The "+ Packed" row is the
  one measured without torch.compile.
* torchtitan docs/performance.md (pytorch/torchtitan): Llama 3 8B on 64 A100 80GB with FSDP2,
  local batch 1, sequence 8192, selective activation checkpointing, tokens/s per GPU
  (a multi-GPU pre-training figure, for the distributed model).

The planner models eager PyTorch (transformers/PEFT under the HF Trainer); compiled rows are
expected to run faster than predicted (torchtune measured +27% from torch.compile on the 3B
full fine-tune). "implied MFU" is the published tokens/s x the planner's FLOPs per token over
the card's dense peak: figures far above ~60% say the FLOP count, the card or the published
figure does not describe the same run (e.g. the "A6000" rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field

from vramplan.config import make_config
from vramplan.distributed import SINGLE, make_parallel
from vramplan.gpus import get_gpu
from vramplan.models import get_model
from vramplan.throughput import NO_PROFILE, step_time, step_work

TORCHTUNE = "torchtune README (pytorch/torchtune), Memory and training speed"
TORCHTUNE_FLAGS = "torchtune README (pytorch/torchtune), Optimization flags (Llama 3.2 3B, 1x A100)"
TORCHTITAN = "torchtitan docs/performance.md (pytorch/torchtitan), Llama 3 8B, 64x A100 FSDP2"
TT_LORA = "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class Point:
    label: str
    model: str
    method: str
    gpu: str
    batch: int
    seq: int
    published_tps: float          # tokens/s per GPU
    source: str
    compiled: bool = False
    gpus: int = 1
    strategy: str | None = None
    settings: dict = field(default_factory=dict)
    note: str = ""


POINTS = [
    Point("8B full, 4090", "llama-3.1-8b", "full", "rtx4090", 2, 2048, 1650, TORCHTUNE, True,
          settings=dict(grad_ckpt=True, optimizer="paged_adamw_8bit", precision="bf16", framework="torchtune",
                        techniques=["opt_in_bwd"])),
    Point("8B full, A6000", "llama-3.1-8b", "full", "rtxa6000", 2, 2048, 2579, TORCHTUNE, True,
          settings=dict(grad_ckpt=True, optimizer="paged_adamw_8bit", precision="bf16", framework="torchtune",
                        techniques=["opt_in_bwd"]),
          note="implies more than the RTX A6000's dense peak; an RTX 6000 Ada (364 TF) would fit the figure"),
    Point("8B LoRA, 4090", "llama-3.1-8b", "lora", "rtx4090", 2, 2048, 3083, TORCHTUNE, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", targets=TT_LORA)),
    Point("8B LoRA, A6000", "llama-3.1-8b", "lora", "rtxa6000", 2, 2048, 4699, TORCHTUNE, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", targets=TT_LORA),
          note="implies more than the RTX A6000's dense peak; an RTX 6000 Ada (364 TF) would fit the figure"),
    Point("8B LoRA, A6000 read as RTX 6000 Ada", "llama-3.1-8b", "lora", "rtx6000ada", 2, 2048, 4699, TORCHTUNE, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", targets=TT_LORA),
          note="the same published figure on the card it may have been"),
    Point("8B QLoRA, 4090", "llama-3.1-8b", "qlora", "rtx4090", 2, 2048, 2413, TORCHTUNE, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", targets=TT_LORA)),
    Point("3B full, packed (eager)", "llama-3.2-3b", "full", "a100-80gb", 2, 4096, 7075, TORCHTUNE_FLAGS, False,
          settings=dict(grad_ckpt=False, precision="bf16", framework="torchtune")),
    Point("3B full, + compile", "llama-3.2-3b", "full", "a100-80gb", 2, 4096, 8998, TORCHTUNE_FLAGS, True,
          settings=dict(grad_ckpt=False, precision="bf16", framework="torchtune")),
    Point("3B full, + chunked CE + AC", "llama-3.2-3b", "full", "a100-80gb", 2, 4096, 7210, TORCHTUNE_FLAGS, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", techniques=["chunked_ce"])),
    Point("3B full, + opt-in-bwd + act offload + 8-bit AdamW", "llama-3.2-3b", "full", "a100-80gb", 2, 4096, 6960,
          TORCHTUNE_FLAGS, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", optimizer="adamw_8bit",
                        techniques=["chunked_ce", "opt_in_bwd", "act_offload"])),
    Point("3B LoRA", "llama-3.2-3b", "lora", "a100-80gb", 2, 4096, 8210, TORCHTUNE_FLAGS, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", targets=TT_LORA,
                        techniques=["chunked_ce", "act_offload"])),
    Point("3B QLoRA", "llama-3.2-3b", "qlora", "a100-80gb", 2, 4096, 8035, TORCHTUNE_FLAGS, True,
          settings=dict(grad_ckpt=True, precision="bf16", framework="torchtune", targets=TT_LORA,
                        techniques=["chunked_ce", "act_offload"])),
    Point("Llama 3 8B pre-training, 64x A100 FSDP2", "llama-3-8b", "full", "a100-80gb", 1, 8192, 2904, TORCHTITAN,
          True, gpus=64, strategy="fsdp",
          settings=dict(grad_ckpt=False, precision="bf16", techniques=["selective_ckpt"]),
          note="selective layer AC; multi-node, per-GPU tokens/s; MFU 56.8% by torchtitan's count"),
]


def evaluate(p: Point) -> dict:
    spec = get_model(p.model)
    gpu = get_gpu(p.gpu)
    cfg = make_config(spec, p.method, batch=p.batch, seq=p.seq, **p.settings)
    par = make_parallel(p.gpus, p.strategy) if p.strategy else SINGLE
    t = step_time(spec, cfg, gpu, parallel=par, inputs=NO_PROFILE)
    predicted = float(t.tokens_per_s) / p.gpus
    w = step_work(spec, cfg)
    fpt = float((w.model_flops + w.adapter_flops) / w.tokens)
    peak = gpu.tensor_tflops(cfg.regime.compute_dtype) * 1e12
    out = {"label": p.label, "model": spec.name, "method": cfg.recipe.name, "gpu": gpu.name, "gpus": p.gpus,
           "batch": p.batch, "seq": p.seq, "compiled": p.compiled, "published_tokens_per_s": p.published_tps,
           "predicted_tokens_per_s": round(predicted, 1), "ratio": round(predicted / p.published_tps, 3),
           "implied_mfu": round(p.published_tps * fpt / peak, 3), "predicted_mfu": round(float(t.mfu), 3),
           "source": p.source, "note": p.note}
    calibrated = step_time(spec, cfg, gpu, parallel=par)
    if calibrated.calibrated:
        out["calibrated_tokens_per_s"] = round(float(calibrated.tokens_per_s) / p.gpus, 1)
        out["calibrated_source"] = calibrated.source
    return out


def profile_points() -> list[dict]:
    """Every calibration point (method, tokens per step, achieved TFLOP/s) of the profiles found,
    beside what the default time model says for the same method and tokens on the same card."""
    try:
        from vramplan.profiles import default_search, read_profile
    except ImportError:  # pragma: no cover
        return []
    from vramplan.gpus import catalogue

    rows = []
    seen = set()
    for d in default_search():
        for path in sorted(d.glob("*.json")) if d.is_dir() else []:
            try:
                prof = read_profile(path)
            except Exception as exc:  # a corrupt profile is reported, not fatal here
                rows.append({"profile": str(path), "error": str(exc)})
                continue
            if prof.gpu in seen or prof.gpu not in catalogue():
                continue
            seen.add(prof.gpu)
            gpu = get_gpu(prof.gpu)
            model = (prof.source_info or {}).get("model") or "qwen2.5-0.5b"
            spec = get_model(model)
            for method, tp in prof.throughput.items():
                for tokens, achieved in tp.knots:
                    seq = 2048 if tokens >= 2048 else int(tokens)
                    batch = max(1, int(tokens) // seq)
                    try:
                        cfg = make_config(spec, method, batch=batch, seq=seq)  # a recipe name: dpo+qlora
                    except Exception:
                        continue
                    t = step_time(spec, cfg, gpu, inputs=NO_PROFILE)
                    rows.append({"profile": str(path), "gpu": gpu.name, "model": spec.name, "method": method,
                                 "tokens_per_step": int(tokens), "calibrated_tflops": round(float(achieved), 2),
                                 "default_tflops": round(float(t.achieved_tflops), 2),
                                 "ratio": round(float(t.achieved_tflops) / float(achieved), 3) if achieved else None})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = [evaluate(p) for p in POINTS]
    prof = profile_points()
    eager = [r["ratio"] for r in rows if not r["compiled"]]
    compiled = [r["ratio"] for r in rows if r["compiled"] and r["implied_mfu"] < 0.9]
    summary = {"median_ratio_eager": statistics.median(eager) if eager else None,
               "median_ratio_compiled": statistics.median(compiled) if compiled else None}
    if a.json:
        print(json.dumps({"published": rows, "profiles": prof, "summary": summary}, indent=2))
        return 0
    w = sys.stdout.write
    w(f"{'point':52} {'published':>9} {'predicted':>9} {'pred/pub':>8} {'impl.MFU':>8} {'pred.MFU':>8}\n")
    for r in rows:
        w(f"{r['label'][:52]:52} {r['published_tokens_per_s']:>9,.0f} {r['predicted_tokens_per_s']:>9,.0f} "
          f"{r['ratio']:>8.2f} {r['implied_mfu']:>8.0%} {r['predicted_mfu']:>8.0%}"
          + ("  (compiled)" if r["compiled"] else "") + "\n")
        if r["note"]:
            w(f"    note: {r['note']}\n")
        if "calibrated_tokens_per_s" in r:
            w(f"    with the card's profile: {r['calibrated_tokens_per_s']:,.0f} ({r['calibrated_source']})\n")
    w(f"\nmedian predicted/published: eager {summary['median_ratio_eager']}, compiled "
      f"{summary['median_ratio_compiled']} (rows implying >= 90% MFU left out)\n")
    w("sources:\n  " + "\n  ".join(sorted({r['source'] for r in rows})) + "\n")
    if not prof:
        w("\ncalibration points: no profile found (profiles/<gpu>.json); run `vramplan calibrate` on a GPU\n")
    else:
        w(f"\n{'profile point':48} {'calibrated TF':>13} {'default TF':>10} {'ratio':>6}\n")
        for r in prof:
            if "error" in r:
                w(f"{r['profile']}: {r['error']}\n")
                continue
            w(f"{r['gpu'] + ' ' + r['method'] + ' @' + str(r['tokens_per_step']) + ' tok':48} "
              f"{r['calibrated_tflops']:>13.1f} {r['default_tflops']:>10.1f} {r['ratio'] or 0:>6.2f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
