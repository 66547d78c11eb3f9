"""Dry-run wall time and peak RSS for Llama-3.1-70B (issue 3: < 60 s and < 4 GiB on a 2-core machine).

Usage: ``python benchmarks/dryrun_speed.py [--method lora] [--seq 2048] [--batch 1] [--grad-ckpt]``.
The config is Llama-3.1-70B's ``config.json`` shape (hidden 8192, 80 layers, 64 heads, 8 kv heads,
intermediate 28672, vocab 128256), built in code: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

LLAMA_31_70B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lora")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--grad-ckpt", action="store_true", default=None)
    ap.add_argument("--precision", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    from vramplan.dryrun import dryrun
    from vramplan.models import from_hf_config

    t_import = time.perf_counter() - t0
    spec = from_hf_config(LLAMA_31_70B, name="llama-3.1-70b")
    t1 = time.perf_counter()
    res = dryrun(spec, a.method, adapter=a.adapter, batch=a.batch, seq=a.seq, grad_ckpt=a.grad_ckpt,
                 precision=a.precision)
    wall = time.perf_counter() - t1
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    print(f"llama-3.1-70b {res.method}+{res.adapter} {res.config.precision} batch {a.batch} seq {a.seq} "
          f"gc {'on' if res.config.grad_ckpt else 'off'}")
    print(f"import {t_import:.1f} s, dry run {wall:.1f} s, peak RSS {rss:.0f} MiB")
    print(f"tensor peak {res.tensor_peak_bytes / 2**30:.2f} GiB in {res.peak_phase.value}; params {res.params:,}; "
          f"trainable {res.trainable_params:,}")
    for c, v in res.components.items():
        if v and c.is_tensor:
            print(f"  {c.value:18s} {v / 2**30:10.3f} GiB")
    ok = wall + t_import < 60 and rss < 4096
    print("OK" if ok else "TOO SLOW OR TOO BIG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
