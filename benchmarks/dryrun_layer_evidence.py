"""Per-layer saved-activation bytes per token, op by op, measured by the dry run.

For a few architectures (real widths, 4 layers, configs built in code -- nothing is
downloaded) x methods x precision regimes x gradient checkpointing off/on, the dry run's
tracker reports what the middle decoder layer allocated during the measured step's first
forward and still held when that forward ended (the tensors saved for backward, or under
gradient checkpointing the layer's output kept as the next checkpoint's input), and, with
checkpointing, what its recomputation held when the recomputation ended. Bytes are divided
by the micro-batch's tokens (batch x seq) and by hidden_size, so the analytic model's
activation coefficients (``vramplan/activations.py``) can be read off directly.

Autocast's cached weight casts (``autocast_cache``) do not scale with tokens: they are
listed in bytes per layer, apart.

Usage: ``python benchmarks/dryrun_layer_evidence.py [--arch llama ...] [--method lora ...]
[--precision bf16-mixed ...] [--seq 1024] > reports/dryrun_layer_evidence.txt``
"""

from __future__ import annotations

import argparse
import sys
import time

ARCHS = {
    # Llama-3-8B widths (meta-llama/Meta-Llama-3-8B config.json), 4 layers
    "llama": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-5},
    # Qwen2-0.5B widths (Qwen/Qwen2-0.5B config.json): qkv bias, tied embeddings
    "qwen2": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    # Gemma-2-2B widths (google/gemma-2-2b config.json): 4 norms, head_dim 256, softcapping -> eager attention
    "gemma2": {"model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
               "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000,
               "hidden_activation": "gelu_pytorch_tanh"},
    # Phi-3-mini widths (microsoft/Phi-3-mini-4k-instruct config.json): fused qkv and gate_up
    "phi3": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32064, "pad_token_id": 32000},
    # Mixtral-8x7B widths (mistralai/Mixtral-8x7B-v0.1 config.json): 8 experts, top-2
    "mixtral": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000},
}
LAYERS = 4
METHODS = ("full", "lora", "qlora", "dora", "ia3")
REGIMES = ("bf16-mixed", "bf16", "fp32")


def _fmt(x: float) -> str:
    return f"{x:10.2f}"


def run(arch: str, method: str, precision: str, gc: bool, seq: int, batch: int, out) -> dict | None:
    from vramplan.dryrun import dryrun
    from vramplan.models import from_hf_config

    cfg = dict(ARCHS[arch], num_hidden_layers=LAYERS, max_position_embeddings=max(4096, seq))
    spec = from_hf_config(cfg, name=f"{arch}-{LAYERS}l")
    attn = "eager" if arch == "gemma2" else "sdpa"
    t0 = time.perf_counter()
    try:
        res = dryrun(spec, method, batch=batch, seq=seq, precision=precision, grad_ckpt=gc, attn=attn)
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"== {arch} | {method} | {precision} | gc {'on' if gc else 'off'}: FAILED {exc.__class__.__name__}: "
              f"{str(exc).splitlines()[0][:200]}", file=out)
        return None
    layer = res.layer
    tokens = batch * seq
    h = spec.hidden_size
    saved = layer["saved"]
    rec = layer.get("recomputed") or {"ops": {}, "components": {}}

    def per_token(section) -> float:
        return section["components"].get("activations", 0) / tokens

    row = {"arch": arch, "method": method, "precision": precision, "gc": gc, "saved": per_token(saved),
           "recomputed": per_token(rec), "h": h,
           "cache": saved["components"].get("autocast_cache", 0) + rec["components"].get("autocast_cache", 0),
           "attn": res.extra.get("sdpa_backends") or {"eager": 1}}
    print(f"== {arch} (h={h}, i={spec.intermediate_size}, heads {spec.num_heads}/{spec.num_kv_heads}, head_dim "
          f"{spec.head_dim}) | {method} (targets {','.join(res.config.targets) or '-'}) | {precision} | "
          f"gc {'on' if gc else 'off'} | attn {attn} {row['attn']} | layer {layer['index']} of {LAYERS} | "
          f"{tokens} tokens | {time.perf_counter() - t0:.1f} s", file=out)
    for title, section in (("saved across the forward", saved), ("held by the recomputation", rec)):
        if not section["ops"]:
            continue
        acts = per_token(section)
        print(f"  {title}: {acts:.2f} B/token = {acts / h:.3f} x h", file=out)
        print(f"    {'B/token':>10s} {'x h':>8s}  submodule:op", file=out)
        for key, nbytes in section["ops"].items():
            if key.endswith("]"):
                continue
            print(f"    {_fmt(nbytes / tokens)} {nbytes / tokens / h:8.3f}  {key}", file=out)
        cached = {k: v for k, v in section["ops"].items() if k.endswith("]")}
        if cached:
            print("    other components (bytes per layer, token-independent):", file=out)
            for key, nbytes in cached.items():
                print(f"    {nbytes:>10d} B     {key}", file=out)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--method", nargs="*", default=list(METHODS))
    ap.add_argument("--precision", nargs="*", default=list(REGIMES))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    out = sys.stdout
    import torch
    import transformers

    print(f"# dry-run per-layer activation evidence: torch {torch.__version__}, transformers "
          f"{transformers.__version__}; batch {a.batch} x seq {a.seq}; {LAYERS} layers, the middle one sampled",
          file=out)
    print("# B/token = bytes the layer holds per token of the micro-batch; x h = the same divided by hidden_size",
          file=out)
    rows = []
    t0 = time.perf_counter()
    for arch in a.arch:
        for method in a.method:
            for precision in a.precision:
                for gc in (False, True):
                    r = run(arch, method, precision, gc, a.seq, a.batch, out)
                    if r:
                        rows.append(r)
                    out.flush()
    print("\n# summary: per-layer activations per token (B/token, and / hidden_size); gc on: kept + recomputed",
          file=out)
    print(f"{'arch':8s} {'method':6s} {'precision':11s} {'gc':3s} {'B/token':>10s} {'x h':>7s} "
          f"{'recomp B/tok':>12s} {'x h':>7s} {'cast cache B':>12s}", file=out)
    for r in rows:
        print(f"{r['arch']:8s} {r['method']:6s} {r['precision']:11s} {'on' if r['gc'] else 'off':3s} "
              f"{r['saved']:10.1f} {r['saved'] / r['h']:7.2f} {r['recomputed']:12.1f} {r['recomputed'] / r['h']:7.2f} "
              f"{r['cache']:12d}", file=out)
    print(f"# {len(rows)} runs in {time.perf_counter() - t0:.0f} s", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
