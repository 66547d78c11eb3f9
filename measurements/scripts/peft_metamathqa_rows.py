"""Print published_extra.csv rows from PEFT's MetaMathQA method-comparison results (no figure typed by hand).

    python measurements/scripts/peft_metamathqa_rows.py PEFT_GIT_DIR 51c2ff666b \
        lora--llama-3.2-3B-rank64-rslora:"LoRA (rsLoRA scaling)":"q_proj,v_proj" \
        lora--llama-3.2-3B-rank10-target-mlp:LoRA:"gate,up,down"

Each argument is ``result-name:method cell:targets cell``; the figure is
``train_info.accelerator_memory_reserved_99th`` of ``method_comparison/MetaMathQA/results/<name>.json`` at the
commit, in MiB (``sources.toml [source.peft-MetaMathQA-method-comparison]`` says how it is read). Reads the
repository with ``git show``; writes CSV to stdout.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys


def row(repo: str, commit: str, name: str, method: str, targets: str) -> list[str]:
    path = f"method_comparison/MetaMathQA/results/{name}.json"
    d = json.loads(subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, text=True,
                                  check=True).stdout)
    ri, ti = d["run_info"], d["train_info"]
    pc, tc = ri["peft_config"], ri["train_config"]
    b = ti["accelerator_memory_reserved_99th"]
    notes = (f"unit=MiB, converted from the JSON's train_info.accelerator_memory_reserved_99th ({b} B): the 99th percentile of "
             "torch.cuda.memory_reserved() - the reserve at start (a 1x1 Linear), sampled after every training step, with "
             "torch.cuda.empty_cache() every 10 steps (so each sample is the peak reserve of the last <=10 steps); "
             f"accelerator_memory_max ({ti['accelerator_memory_max']} B) includes the evaluation's generation at batch 50 and is "
             f"not used; dtype {tc['dtype']}, use_amp {str(tc['use_amp']).lower()}, use_gc {str(tc['use_gc']).lower()}, batch "
             f"{tc['batch_size']}, max_seq_length {tc['max_seq_length']} (MetaMathQA in length buckets), AdamW lr "
             f"{tc['optimizer_kwargs'].get('lr')}, lora r {pc['r']} alpha {pc['lora_alpha']} use_rslora "
             f"{str(pc['use_rslora']).lower()} (a scaling factor: no memory of its own), target_modules "
             f"{sorted(pc['target_modules'])}, lora_dropout {pc['lora_dropout']}; created {ri['created_at']}"
             + (f"; {ti['num_trainable_params']} trainable parameters" if ti.get("num_trainable_params") else ""))
    return ["peft-MetaMathQA-method-comparison", f"huggingface/peft:{path} @{commit} (run {ri['created_at'][:10]})",
            "Llama 3.2 3B", "3.21", method, str(pc["r"]), targets, "bf16", "AdamW (torch)", str(tc["batch_size"]),
            f"<={tc['max_seq_length']} (max_seq_length; bucketed batches padded to their longest)", "off (use_gc false)",
            "sdpa (attn_implementation null: the transformers default)", "1x L40S", f"{b / 2**20:.2f}", "unknown",
            "measured", notes]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    repo, commit, *specs = argv
    out = csv.writer(sys.stdout, lineterminator="\n")
    for spec in specs:
        name, method, targets = spec.split(":", 2)
        out.writerow(row(repo, commit, name, method, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
