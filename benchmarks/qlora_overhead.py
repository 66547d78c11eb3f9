"""QLoRA's dequantisation cost implied by published LoRA-vs-QLoRA pairs: effective bytes per NF4 weight and pass.

    python benchmarks/qlora_overhead.py          # table + the median the throughput model uses
    python benchmarks/qlora_overhead.py --json

Each pair is one source's LoRA and QLoRA run with the same model, card, micro-batch, sequence,
rank and targets, so their ratio isolates what the 4-bit base costs. For each pair the script
takes the throughput model's own LoRA micro-step time at the published shape (no calibration
profile) and solves for the bytes per NF4 weight and layer pass that make the model's QLoRA
time reproduce the published ratio::

    bytes = (tps_lora / tps_qlora - 1) x t_lora / (NF4 weights x passes) x bandwidth x 0.8

The throughput model (``vramplan.throughput.DEQUANT_BYTES_PER_PARAM``) uses the median of the
bitsandbytes pairs; ``tests/test_throughput.py`` checks the constant against this table's
median, so the two cannot drift apart. Pairs (``/work/shared/measurements/published.csv`` rows,
and the sources they cite):

* litgpt config hub (Lightning-AI/litgpt ``config_hub/finetune/README.md`` @26857050, A10G,
  bf16-true, bitsandbytes ``bnb.nf4``, Alpaca2k, ``max_seq_length`` 512 with dynamic padding):
  training runtime of the same config's epochs; the ratio of runtimes is the ratio of tokens/s.
  The real sequences are shorter than 512 (dynamic padding), so the model's LoRA time at 512
  is an upper bound and so is the implied figure.
* LLaMA-Factory wiki "Performance Comparison" (via unslothai/unsloth README @0a2c3973): Llama-2-7B,
  1x A100 (80 GB assumed), batch 4, max length 1024, LoRA rank 8, HF vs HF + bitsandbytes 4-bit.
* torchtune README (pytorch/torchtune, "Memory and training speed"): Llama-3.1-8B on an RTX 4090,
  batch 2, packed 2048, torch.compile, torchao NF4 -- not bitsandbytes: printed, not in the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass

LITGPT = "litgpt config_hub/finetune/README.md @26857050 (A10G, runtime of the config's epochs)"
LF = "LLaMA-Factory wiki Performance-Comparison via unsloth README @0a2c3973 (tokens/s)"
TT = "torchtune README, Memory and training speed (tokens/s, compiled, torchao NF4)"
ALL = "q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"


@dataclass
class Pair:
    label: str
    model: str
    gpu: str
    batch: int
    seq: int
    rank: int
    targets: str | None
    lora: float      # tokens/s, or a runtime when ``runtime`` (then lower is faster)
    qlora: float
    source: str
    runtime: bool = False
    bnb: bool = True
    precision: str | None = None
    grad_ckpt: bool = False
    framework: str = "hf"

    @property
    def slowdown(self) -> float:
        """QLoRA's tokens/s as a fraction of LoRA's (published)."""
        return self.lora / self.qlora if self.runtime else self.qlora / self.lora


PAIRS = [
    Pair("Mistral-7B r32 q,v b2 <=512", "mistral-7b", "a10g", 2, 512, 32, "q_proj,v_proj", 31.00, 44.75, LITGPT,
         runtime=True, precision="bf16"),
    Pair("Phi-3-mini r8 all linear b4 <=512", "phi-3-mini-4k", "a10g", 4, 512, 8, "all-linear", 6.46, 7.47, LITGPT,
         runtime=True, precision="bf16"),
    Pair("Llama-2-7B r8 b4 x 1024", "llama-2-7b", "a100-80gb", 4, 1024, 8, None, 2392, 2415, LF),
    Pair("Llama-3.1-8B r8 b2 x 2048 (torchao)", "llama-3.1-8b", "rtx4090", 2, 2048, 8,
         "q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 3083, 2413, TT, bnb=False, precision="bf16",
         grad_ckpt=True, framework="torchtune"),
]


def implied(p: Pair) -> dict:
    from vramplan.config import make_config
    from vramplan.gpus import get_gpu
    from vramplan.models import get_model
    from vramplan.throughput import NO_PROFILE, card_efficiency, step_time, step_work

    spec, gpu = get_model(p.model), get_gpu(p.gpu)
    kw = dict(batch=p.batch, seq=p.seq, rank=p.rank, targets=p.targets, precision=p.precision,
              grad_ckpt=p.grad_ckpt, framework=p.framework)
    lora = make_config(spec, "lora", **kw)
    qlora = make_config(spec, "qlora", **kw)
    t_lora = float(step_time(spec, lora, gpu, inputs=NO_PROFILE).micro_s)
    gparams = step_work(spec, qlora).train_dequant_gparams
    bw = gpu.bandwidth_gbs * 1e9 * card_efficiency(gpu).bandwidth
    extra_s = (1.0 / p.slowdown - 1.0) * t_lora
    b = max(0.0, extra_s * bw / (gparams * 1e9))
    return {"pair": p.label, "gpu": p.gpu, "published_qlora_over_lora": round(p.slowdown, 3),
            "model_lora_micro_s": round(t_lora, 4), "implied_bytes_per_weight_pass": round(b, 2),
            "bitsandbytes": p.bnb, "source": p.source}


def median_bnb(rows: list[dict]) -> float:
    return float(statistics.median(r["implied_bytes_per_weight_pass"] for r in rows if r["bitsandbytes"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rows = [implied(p) for p in PAIRS]
    med = median_bnb(rows)
    from vramplan.throughput import DEQUANT_BYTES_PER_PARAM

    if a.json:
        print(json.dumps({"pairs": rows, "median_bitsandbytes": med, "model_constant": DEQUANT_BYTES_PER_PARAM}, indent=2))
        return 0
    print(f"{'pair':40} {'gpu':10} {'QLoRA/LoRA tok/s':>16} {'LoRA micro s':>12} {'B/weight/pass':>13}  source")
    for r in rows:
        print(f"{r['pair']:40} {r['gpu']:10} {r['published_qlora_over_lora']:>16.3f} {r['model_lora_micro_s']:>12.3f} "
              f"{r['implied_bytes_per_weight_pass']:>13.1f}  {r['source']}" + ("" if r["bitsandbytes"] else " [not bnb]"))
    print(f"median of the bitsandbytes pairs: {med:.1f} bytes per NF4 weight and pass; "
          f"vramplan.throughput.DEQUANT_BYTES_PER_PARAM = {DEQUANT_BYTES_PER_PARAM:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
