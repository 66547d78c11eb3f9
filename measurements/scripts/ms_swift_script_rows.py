"""Print published_extra.csv rows from ms-swift 2.x example scripts (no figure typed by hand).

    python measurements/scripts/ms_swift_script_rows.py MS_SWIFT_GIT_DIR \
        examples/pytorch/llm/scripts/llama3_8b_instruct/lora/sft.sh@334ddc4d5:"Meta-Llama-3-8B-Instruct"

Each argument is ``path@commit:model cell[:targets cell]`` (the targets cell for a script that says
``--lora_target_modules DEFAULT``: the model registry's list at the commit, with its source); the commit is the one whose version of the script carries the
``# NNGB GPU memory`` comment with the settings read (``git log -S"GPU memory" -- path``). The row takes the
figure and the card list from the comment lines, the settings from the ``--key value`` arguments of the
command; a setting the script leaves out is the stack's default (``sources.toml [source.ms-swift-examples-v2]``
says which). Reads the repository with ``git show``; writes CSV to stdout.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys


def script_args(text: str) -> dict[str, str]:
    """``--key value`` pairs of the script's command (line continuations joined)."""
    flat = text.replace("\\\n", " ")
    return {m.group(1): m.group(2) for m in re.finditer(r"--(\w+)\s+('[^']*'|\"[^\"]*\"|[^\s\\]+)", flat)}


def row(repo: str, spec: str) -> list[str]:
    path_commit, model, *rest = spec.split(":", 2)
    path, commit = path_commit.split("@", 1)
    text = subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, text=True,
                          check=True).stdout
    mem = re.search(r"^#\s*([\d.]+)\s*GB GPU memory", text, re.M)
    env = re.search(r"^#\s*Experimental environment:\s*(.+)$", text, re.M)
    if not mem:
        raise SystemExit(f"{path}@{commit}: no '# NNGB GPU memory' comment")
    a = script_args(text)
    sft = a.get("sft_type", "lora")
    quant = a.get("quantization_bit", "0") not in ("0", "")
    method = "full" if sft == "full" else ("QLoRA" if quant else "LoRA")
    targets = a.get("lora_target_modules", "DEFAULT")
    rank = a.get("lora_rank", "8") if sft != "full" else "n/a"
    gc = a.get("gradient_checkpointing")
    gc_cell = {"true": "on (--gradient_checkpointing true)", "false": "off (--gradient_checkpointing false)"}.get(
        gc, "unknown (not in the script)")
    attn = {"true": "flash_attn (--use_flash_attn true)", "false": "eager (FA2 off in the script: the transformers release's own attention, eager for Llama before 4.36)"}.get(
        a.get("use_flash_attn", ""), "sdpa (no FA2 flag in the script: ms-swift's default)")
    cards = env.group(1).strip() if env else "not stated"
    notes = (f"script comment '# {mem.group(1)}GB GPU memory' (rounded; which statistic is not stated), 'Experimental "
             f"environment: {cards}'; CUDA_VISIBLE_DEVICES=0; --dataset {a.get('dataset', '?')}, --max_length "
             f"{a.get('max_length', '2048 (default)')} (truncation_strategy default 'delete': a bound), --batch_size "
             f"{a.get('batch_size', '1 (default)')}, --gradient_accumulation_steps {a.get('gradient_accumulation_steps', '?')}, "
             f"--dtype {a.get('dtype', 'AUTO (default)')}, --tuner_backend {a.get('tuner_backend', 'default')}, --lora_rank "
             f"{a.get('lora_rank', '8 (default)')}, --lora_alpha {a.get('lora_alpha', '32 (default)')}, --lora_dropout_p "
             f"{a.get('lora_dropout_p', '0.05 (default)')}, --lora_target_modules {targets}")
    if rest:  # DEFAULT targets: the model registry's list at the commit, given by the caller with its source
        target_cell = rest[0]
    elif targets == "ALL":
        target_cell = "all-linear (--lora_target_modules ALL)"
    else:
        target_cell = f"{targets} (swift's)"
    precision = ("bf16 (--dtype AUTO: the checkpoint's bf16 under the HF Trainer's autocast)" if a.get("dtype", "AUTO")
                 == "AUTO" else a["dtype"])
    if quant:
        dq = a.get("bnb_4bit_use_double_quant", "true") == "true"
        precision = (f"{a.get('bnb_4bit_quant_type', 'nf4').upper()} 4-bit (--quantization_bit 4; "
                     + ("double quant: bnb_4bit_use_double_quant default True" if dq else "NQ off")
                     + f") + bf16 compute (--bnb_4bit_comp_dtype {a.get('bnb_4bit_comp_dtype', 'AUTO')})")
    return ["ms-swift-examples-v2", f"modelscope/ms-swift:{path} @{commit}", model, "",
            method, rank, target_cell, precision, "AdamW (HF Trainer default)", a.get("batch_size", "1"),
            f"<={a.get('max_length', '2048')} (--max_length)", gc_cell, attn, f"1x GPU (one of: {cards})",
            mem.group(1), "unknown", "measured", notes]


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    repo, *specs = argv
    out = csv.writer(sys.stdout, lineterminator="\n")
    for spec in specs:
        out.writerow(row(repo, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
