"""The sharded planner held to the traced engines: per-rank peak, planner vs distributed dry run.

Runs :func:`vramplan.dryrun.distributed.run_jobs` (N local CPU ranks, gloo) over a grid of
strategies x methods x rank counts on a small model built from its config, and prints per row
the planner's per-rank tensor peak (:func:`vramplan.distributed.parallel_step_memory`), the
largest traced per-rank peak, and the error; writes ``reports/dryrun_distributed.txt``.

    PYTHONPATH=. python benchmarks/dryrun_distributed.py            # the full grid (2 and 4 ranks)
    PYTHONPATH=. python benchmarks/dryrun_distributed.py --ranks 2 --out -   # 2 ranks, print only

DeepSpeed rows run when DeepSpeed is installed (its CPU accelerator with gloo).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vramplan.distributed import STRATEGIES  # noqa: E402 - after the path (numpy only, no torch); every strategy

#: the grid's model: a llama-architecture config small enough for 4 CPU ranks on 2 cores, with
#: the model state a large share of the peak (hidden 256, vocab 2048, 2 decoder layers)
GRID_MODEL = dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512,
                  tie_word_embeddings=False)
#: the CI grid's model (tests/test_dryrun_distributed.py)
TINY_MODEL = dict(GRID_MODEL, hidden_size=128, intermediate_size=256, vocab_size=1024)
METHODS = ("full", "lora", "qlora")
BATCH, SEQ = 1, 64
TOLERANCE = 0.02
#: gradient-accumulation rows (torch engines): 2 micro-batches per step, the sync skipped on the first
#: (DDP no_sync / FSDP2 set_requires_gradient_sync(False): HF Trainer, litgpt) or run on both (torchtune)
ACCUM_VARIANTS = ({"grad_accum": 2, "no_sync": True}, {"grad_accum": 2, "no_sync": False})


@dataclass
class Row:
    gpus: int
    strategy: str
    engine: str
    method: str
    options: dict
    planned: int
    traced: int | None
    rank_peaks: list[int]
    phase: str
    error: str | None = None
    planned_phase: str = ""

    @property
    def rel(self) -> float | None:
        if self.traced is None or not self.traced:
            return None
        return (self.planned - self.traced) / self.traced

    def line(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"
        head = f"{self.gpus:>2}  {self.strategy:<6} {self.engine:<9} {self.method:<6} {opts:<28}"
        if self.error:
            return head + f" planner {self.planned / 2**20:9.3f} MiB  traced: {self.error}"
        return (head + f" {self.planned / 2**20:9.3f} {self.traced / 2**20:9.3f} {100 * self.rel:+7.2f}%  "
                f"{self.planned_phase}/{self.phase}  ranks " + " ".join(f"{p / 2**20:.3f}" for p in self.rank_peaks))


HEADER = (" N  strat  engine    method options                      planner    traced   error   peak phase (plan/"
          "trace), traced per-rank peaks MiB")


def grid(model: dict = GRID_MODEL, ranks=(2, 4), strategies=STRATEGIES, methods=METHODS, engines=None,
         batch: int = BATCH, seq: int = SEQ, extra_options: bool = True, timeout: float = 900.0,
         cache: str | None = None) -> list[Row]:
    """Trace every row and plan it; one spawned group per rank count."""
    from vramplan.distributed import make_parallel, parallel_step_memory
    from vramplan.dryrun.distributed import Job, deepspeed_available, distributed_config, run_jobs
    from vramplan.models import from_hf_config

    spec = from_hf_config(model, name=f"llama-h{model['hidden_size']}-l{model['num_hidden_layers']}")
    if engines is None:
        engines = ("torch", "deepspeed") if deepspeed_available() else ("torch",)
    rows: list[Row] = []
    for n in ranks:
        jobs, meta = [], []
        for method in methods:
            cfg = distributed_config(spec, method, precision="bf16", batch=batch, seq=seq, attn="eager",
                                     grad_ckpt=False)
            for engine in engines:
                for strategy in strategies:
                    if engine == "deepspeed" and not strategy.startswith("zero"):
                        continue
                    variants = [{}]
                    if extra_options and engine == "torch" and strategy == "fsdp":
                        variants.append({"reshard_after_forward": False})
                    if extra_options and engine == "torch" and strategy == "ddp":
                        variants.append({"gradient_as_bucket_view": True})
                    nf4 = cfg.recipe.adapter.quantized_base
                    if extra_options and engine == "torch" and strategy in ("ddp", "fsdp") and not nf4:
                        variants += [dict(v) for v in ACCUM_VARIANTS]
                    if extra_options and engine == "deepspeed" and not nf4:
                        variants.append({"grad_accum": 2})  # DeepSpeed's own accumulation to its boundary
                    for opts in variants:
                        job_cfg = cfg if "grad_accum" not in opts else distributed_config(
                            spec, method, precision="bf16", batch=batch, seq=seq, attn="eager", grad_ckpt=False,
                            grad_accum=opts["grad_accum"])
                        engine_opts = {k: v for k, v in opts.items() if k != "grad_accum"}
                        jobs.append(Job(spec, job_cfg, strategy, engine, engine_opts))
                        meta.append((method, engine, strategy, opts, job_cfg))
        results = _traced(jobs, n, timeout, cache, meta)
        for (method, engine, strategy, opts, cfg), res in zip(meta, results):
            par = make_parallel(n, strategy)
            # DeepSpeed on its CPU accelerator runs torch's AdamW (FusedAdam needs CUDA): planned with torch_adam
            par = replace(par, engine=engine, torch_adam=engine == "deepspeed",
                          **{k: v for k, v in opts.items() if k != "grad_accum"})
            sm = parallel_step_memory(spec, cfg, par)
            from vramplan.memory import PHASE_ORDER

            planned_phase = PHASE_ORDER[int(sm.peak_phase)].value
            if isinstance(res, str):
                rows.append(Row(n, strategy, engine, method, opts, int(sm.peak), None, [], "", error=res,
                                planned_phase=planned_phase))
                continue
            top = max(res, key=lambda r: r.peak_bytes)
            rows.append(Row(n, strategy, engine, method, opts, int(sm.peak), top.peak_bytes,
                            [r.peak_bytes for r in res], top.peak_phase.value, planned_phase=planned_phase))
    return rows


def _traced(jobs, n, timeout, cache, meta):
    """run_jobs, or the traces a previous run kept in ``cache`` (a pickle; for iterating on the planner)."""
    import pickle

    from vramplan.dryrun.distributed import run_jobs

    key = [(n, m[0], m[1], m[2], tuple(sorted(m[3].items()))) for m in meta]
    store = {}
    if cache and os.path.exists(cache):
        with open(cache, "rb") as fh:
            store = pickle.load(fh)
    todo = [i for i, k in enumerate(key) if k not in store]
    if todo:
        res = run_jobs([jobs[i] for i in todo], n, timeout=timeout)
        for i, r in zip(todo, res):
            store[key[i]] = r
        if cache:
            with open(cache + ".tmp", "wb") as fh:
                pickle.dump(store, fh)
            os.replace(cache + ".tmp", cache)
    return [store[k] for k in key]


def report(rows: list[Row], model: dict, seconds: float) -> str:
    from importlib.metadata import version

    pk = []
    for name in ("torch", "transformers", "peft", "deepspeed"):
        try:
            pk.append(f"{name} {version(name)}")
        except Exception:
            pass
    ok = [r for r in rows if r.rel is not None]
    worst = max((abs(r.rel) for r in ok), default=float("nan"))
    by_engine = {}
    for r in ok:
        by_engine.setdefault(r.engine, []).append(abs(r.rel))
    per_engine = "; ".join(f"{e}: {len(v)} rows, worst {100 * max(v):.2f}%, {sum(x <= TOLERANCE for x in v)} within"
                           for e, v in sorted(by_engine.items()))
    lines = [
        f"# sharded planner vs distributed dry run (per-rank tensor peak); {', '.join(pk)}",
        f"# model: llama config hidden {model['hidden_size']}, intermediate {model['intermediate_size']}, "
        f"{model['num_hidden_layers']} layers, vocab {model['vocab_size']}; batch {BATCH} x seq {SEQ}; precision bf16 "
        "(no autocast); eager attention; no checkpointing",
        "# engines at their defaults unless 'options' says otherwise: DDP bucket_cap_mb 25, gradient_as_bucket_view "
        "False; FSDP2 reshard_after_forward True (zero2: False), backward prefetch 1 unit, 1 reduce-scatter input "
        "buffer; ZeroRedundancyOptimizer over DDP; DeepSpeed with the HF Trainer's 'auto' buckets (reduce_bucket_size "
        "hidden^2, stage3_prefetch_bucket_size 0.9 hidden^2, stage3_param_persistence_threshold 10 hidden; the rest "
        "DeepSpeed's defaults), torch AdamW on its fp32 partition (FusedAdam needs CUDA; planned with torch_adam)",
        "# the trace leaves out gloo's reduce-scatter / all-gather staging copies (NCCL has none); peaks are the "
        "largest rank's; planner = vramplan.distributed.parallel_step_memory (the engine's layout)",
        f"# {len(ok)} rows traced, {len(rows) - len(ok)} not; worst |error| {100 * worst:.2f}% (target "
        f"{100 * TOLERANCE:.0f}%); {per_engine}",
        HEADER,
        "-" * len(HEADER),
    ]
    lines += [r.line() for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--engines", default=None, help="torch,deepspeed (default: those installed)")
    ap.add_argument("--tiny", action="store_true", help="the CI grid's model")
    ap.add_argument("--cache", default=None, help="keep/reuse the traces in this pickle (planner iterations)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "dryrun_distributed.txt"), help="'-' prints only")
    a = ap.parse_args(argv)
    model = TINY_MODEL if a.tiny else GRID_MODEL
    t0 = time.perf_counter()
    rows = grid(model, tuple(int(x) for x in a.ranks.split(",")), tuple(a.strategies.split(",")),
                tuple(a.methods.split(",")), tuple(a.engines.split(",")) if a.engines else None, cache=a.cache)
    text = report(rows, model, time.perf_counter() - t0)
    print(text, end="")
    if a.out != "-":
        tmp = a.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
