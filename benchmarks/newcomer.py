"""A newcomer's walkthrough: the README's commands and the questions of issue #15, checked.

    python benchmarks/newcomer.py            # everything (the full-catalogue PNG and the dry run take minutes)
    python benchmarks/newcomer.py --quick    # without the two slow ones
    benchmarks/newcomer.sh                   # the same, from a shell

Each command runs as a user would run it (``python -m vramplan ...`` in a fresh process, piped,
``COLUMNS=80``), and the walk fails when one of them

* prints a traceback, or exits other than expected (0, or 2 for the bad-input examples);
* stays silent (nothing on stdout or stderr) for more than 10 s;
* says a plan "does not fit" when it does: every ``fit --json`` row's notes are checked against
  its own plans (a "<adapter> over a 16-bit base does not fit" note while a plan of that adapter
  fits), its ``fits`` against ``estimate`` of the same configuration, and a fallback (QLoRA) row
  against a 16-bit plan that fits with the margin;
* truncates a name: ``vramplan models`` and ``vramplan gpus``, piped and as an 80-column
  terminal, must show every catalogue name and alias whole (no "…").

It prints one line per step (seconds, first-output latency, verdict) and exits 1 on any failure.
Speed targets live here, not in the unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SILENT_LIMIT_S = 10.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

AXOLOTL = """base_model: meta-llama/Llama-2-7b-hf
adapter: qlora
load_in_4bit: true
lora_r: 16
lora_alpha: 32
lora_target_linear: true
sequence_len: 2048
micro_batch_size: 2
gradient_accumulation_steps: 4
gradient_checkpointing: true
optimizer: paged_adamw_32bit
bf16: auto
"""


class Step:
    def __init__(self, label: str, args: list[str], *, expect: int = 0, env: dict | None = None,
                 check=None, json_out: bool = False):
        self.label, self.args, self.expect, self.env, self.check, self.json_out = label, args, expect, env, check, json_out


def run(step: Step) -> tuple[bool, str, float, float | None, str, str]:
    """Run one command; return (ok, why, seconds, first-output seconds, stdout, stderr)."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT), **(step.env or {})}
    cmd = [sys.executable, "-m", "vramplan", *step.args]
    t0 = time.monotonic()
    first: list[float] = []
    out_chunks: dict[str, list[bytes]] = {"out": [], "err": []}
    silent_gap = [0.0]
    last = [t0]

    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def pump(stream, key):
        while True:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
            if not chunk:
                break
            now = time.monotonic()
            if not first:
                first.append(now - t0)
            silent_gap[0] = max(silent_gap[0], now - last[0])
            last[0] = now
            out_chunks[key].append(chunk)

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out")),
               threading.Thread(target=pump, args=(proc.stderr, "err"))]
    for t in threads:
        t.start()
    rc = proc.wait()
    for t in threads:
        t.join()
    secs = time.monotonic() - t0
    out = b"".join(out_chunks["out"]).decode("utf-8", "replace")
    err = b"".join(out_chunks["err"]).decode("utf-8", "replace")
    if not first and secs > SILENT_LIMIT_S:
        silent_gap[0] = secs
    problems = []
    if "Traceback (most recent call last)" in out + err:
        problems.append("traceback")
    if rc != step.expect:
        problems.append(f"exit {rc}, expected {step.expect}: {err.strip().splitlines()[-1] if err.strip() else ''}")
    if silent_gap[0] > SILENT_LIMIT_S:
        problems.append(f"silent for {silent_gap[0]:.0f} s")
    if not problems and step.check is not None:
        try:
            msg = step.check(json.loads(out) if step.json_out else ANSI.sub("", out), err)
        except Exception as exc:  # a check that cannot even read the output is a failure too
            msg = f"check raised {type(exc).__name__}: {exc}"
        if msg:
            problems.append(msg)
    return not problems, "; ".join(problems), secs, (first[0] if first else None), out, err


# -- checks ----------------------------------------------------------------------------------

def no_false_no_fit(rep: dict) -> str | None:
    """Every fit row's notes and verdict against its own ranked plans."""
    for row in rep["rows"]:
        plans = row["plans"]
        for p in plans:
            if "does not fit" in p["reason"] and p["peak_bytes"] <= p["capacity_bytes"]:
                return f"{row['requested']}: a plan that fits the card is called 'does not fit': {p['reason']}"
        for note in row["notes"]:
            m = re.search(r"(\w+) over a 16-bit base does not fit", note)
            if m and any(p["adapter"] == m.group(1) and p["peak_bytes"] <= p["capacity_bytes"] for p in plans):
                return f"{row['requested']}: says {m.group(1)} does not fit, but one of its plans does"
            m = re.search(r"(\w+) over a 16-bit base fits only without", note)
            if m and any(p["adapter"] == m.group(1) and p["fits"] for p in plans):
                return f"{row['requested']}: says {m.group(1)} needs the margin, but one of its plans fits with it"
        if row["recommended"] and row["recommended"]["fallback"]:
            own = [p for p in plans if not p["fallback"] and p["fits"]]
            if own:
                return f"{row['requested']}: ranked its fallback first although {own[0]['adapter']} fits"
        if row["fits"] != (row["peak_bytes"] <= row["capacity_bytes"]):
            return f"{row['requested']}: fits={row['fits']} but peak {row['peak_bytes']} vs {row['capacity_bytes']}"
        if row["recipe"] == "qlora" and row["requested"] == "lora" and row["method"] == "lora":
            return "a QLoRA plan is called lora"
    return None


def names_whole(text: str, _err: str) -> str | None:
    sys.path.insert(0, str(ROOT))
    from vramplan.gpus import catalogue as gpus
    from vramplan.models import catalogue as models

    if "…" in text:
        return "an ellipsis: something was cut"
    words = set(text.replace(",", " ").split())
    names = {n for m in models().values() for n in (m.name, *m.aliases)} if "name" in text and "llama" in text else \
        {n for g in gpus().values() for n in (g.name, *g.aliases)}
    missing = sorted(n for n in names if n not in words)
    return f"not shown whole: {', '.join(missing[:5])}" if missing else None


def contains(*needles: str, where: str = "out"):
    def check(out, err):
        text = out if where == "out" else err
        miss = [n for n in needles if n not in text]
        return f"missing {miss}" if miss else None
    return check


def lacks(*needles: str):
    def check(out, err):
        hit = [n for n in needles if n in out + err]
        return f"should not say {hit}" if hit else None
    return check


def api_rows_named_for_what_they_run() -> str | None:
    sys.path.insert(0, str(ROOT))
    import vramplan

    for model, gpu in (("7b", "rtx4090"), ("13b", "rtx4090"), ("mistral-7b", "rtx4090")):
        for r in vramplan.fit(model, gpu).rows:
            if r.adapter == "qlora" and r.method == "lora":
                return f"{model}/{gpu}: rows[] calls a QLoRA plan lora"
            if r.requested == "lora" and any(p.fallback is None and p.fits for p in r.plans) and r.adapter != "lora":
                return f"{model}/{gpu}: LoRA fits but the row runs {r.adapter}"
    return None


def steps(tmp: Path, quick: bool) -> list[Step]:
    cfg = tmp / "my-model"
    cfg.mkdir()
    sys.path.insert(0, str(ROOT))
    from vramplan.models import get_model

    (cfg / "config.json").write_text(json.dumps(get_model("llama-3.2-1b").hf_config))
    (tmp / "axolotl.yml").write_text(AXOLOTL)
    gpt2 = tmp / "gpt2.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768,
                                "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}))
    out = [
        # README, first lines and everyday commands
        Step("README: fit 13b on rtx4000ada", ["fit", "--model", "13b", "--gpu", "rtx4000ada"]),
        Step("README: estimate qlora 8b on a 3080", ["estimate", "--model", "llama-3.1-8b", "--method", "qlora",
                                                      "--gpu", "rtx3080", "--batch", "2", "--seq", "2048"]),
        Step("README: estimate --json", ["estimate", "--model", "7b", "--method", "lora", "--targets", "q_proj,v_proj",
                                         "--json"], json_out=True, check=lambda d, e: None if d["trainable_params"] == 4194304
                                         else f"trainable {d['trainable_params']}"),
        Step("README: estimate a local config.json", ["estimate", "--model", str(cfg / "config.json"), "--method",
                                                      "full", "--gpu-mem", "80GiB"]),
        Step("README: fit --seq 4096", ["fit", "--model", "13b", "--gpu", "rtx4000ada", "--seq", "4096"]),
        Step("README: fit torchtune + act_offload", ["fit", "--model", "llama-3-8b", "--gpu", "rtx4090", "--framework",
                                                     "torchtune", "--techniques", "act_offload"]),
        Step("README: models (piped)", ["models"], check=names_whole),
        Step("README: models (80-column terminal)", ["models"], env={"FORCE_COLOR": "1"}, check=names_whole),
        Step("README: gpus (piped)", ["gpus"], check=names_whole),
        Step("README: gpus (80-column terminal)", ["gpus"], env={"FORCE_COLOR": "1"}, check=names_whole),
        Step("README: methods", ["methods"]),
        Step("README: matrix markdown", ["matrix", "--models", "1b,3b,7b,13b", "--methods", "all", "--gpus",
                                         "rtx3080,rtx4000ada", "--seq", "2048"]),
        Step("README: estimate --config axolotl.yml", ["estimate", "--config", str(tmp / "axolotl.yml"), "--gpu",
                                                      "rtx3080"]),
        # the questions of issue 15
        Step("Q: LoRA Llama-3.1-8B at 4k on a 3090?", ["fit", "--model", "llama-3.1-8b", "--gpu", "rtx3090", "--seq",
                                                      "4096", "--json"], json_out=True, check=lambda d, e: no_false_no_fit(d)),
        Step("Q: 7b on a 4090 (LoRA fits: no QLoRA advice)", ["fit", "--model", "7b", "--gpu", "rtx4090", "--json"],
             json_out=True, check=lambda d, e: no_false_no_fit(d)),
        Step("Q: 7b on a 4090, text", ["fit", "--model", "7b", "--gpu", "rtx4090"],
             check=lacks("LoRA over a 16-bit base does not fit", "lora (qlora)")),
        Step("Q: Mistral-7B on a 4090", ["fit", "--model", "mistral-7b", "--gpu", "rtx4090", "--json"], json_out=True,
             check=lambda d, e: no_false_no_fit(d)),
        Step("Q: 3B on a 3090 with torchtune", ["fit", "--model", "3b", "--gpu", "rtx3090", "--framework", "torchtune",
                                                "--json"], json_out=True, check=lambda d, e: no_false_no_fit(d)),
        Step("Q: cheapest card for full FT of a 3B", ["cards", "--model", "3b", "--methods", "full", "--tokens", "100M"],
             check=contains("cheapest", "prices:")),
        Step("Q: full FT of a 3B on 24 GB: what would fit", ["fit", "--model", "3b", "--gpu", "rtx3090", "--methods",
                                                             "full"], check=contains("--framework torchtune", "--precision bf16")),
        Step("Q: DPO on Mistral-7B with QLoRA on a 4090", ["estimate", "--model", "mistral-7b", "--method", "dpo+qlora",
                                                          "--gpu", "rtx4090"], check=contains("fits")),
        Step("Q: 70B QLoRA on 2 GPUs", ["fit", "--model", "70b", "--gpu", "rtx4090", "--gpus", "2", "--methods", "qlora",
                                        "--json"], json_out=True, check=lambda d, e: no_false_no_fit(d)),
        Step("Q: 70B QLoRA on a 48 GB card", ["fit", "--model", "70b", "--gpu", "rtxa6000", "--methods", "qlora",
                                              "--json"], json_out=True,
             check=lambda d, e: no_false_no_fit(d) or (
                 None if d["rows"][0]["fits"] or any(a["peak_bytes"] <= d["capacity_bytes"]
                                                     for a in d["rows"][0]["alternatives"])
                 else "70B QLoRA: neither the plan nor any other stack fits on 48 GB")),
        Step("Q: Mixtral QLoRA says why it is large", ["fit", "--model", "mixtral", "--gpu", "h200", "--methods", "qlora"],
             check=contains("MoE QLoRA", "#1849")),
        Step("Q: my own config.json", ["fit", "--model", str(cfg), "--gpu", "rtx3080"]),
        Step("Q: a GPT-2 config says what it is", ["estimate", "--model", str(gpt2)], expect=2,
             check=contains("GPT-2 layout", where="err")),
        Step("Q: gemma-3-27b is in the catalogue", ["estimate", "--model", "gemma-3-27b", "--method", "qlora"]),
        Step("Q: an unknown Gemma is not answered with another", ["estimate", "--model", "gemma-4-27b"], expect=2,
             check=lambda o, e: "did you mean" in e and "unknown model did suggest" or
             (None if "config.json" in e else "no config.json hint")),
    ]
    if not quick:
        out += [
            Step("README: dryrun 7b lora --json", ["dryrun", "--model", "7b", "--method", "lora", "--json"], json_out=True,
                 check=lambda d, e: None if d.get("tensor_peak_bytes") else "no tensor peak"),
            Step("README: matrix of the whole catalogue, every format", ["matrix", "--gpus", "all", "--models", "all",
                                                                         "--out", str(tmp / "reports"), "--format",
                                                                         "md,csv,html,png"]),
        ]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the dry run and the full-catalogue PNG")
    a = ap.parse_args(argv)
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        for step in steps(Path(d), a.quick):
            ok, why, secs, first, _out, _err = run(step)
            failures += not ok
            lat = "-" if first is None else f"{first:.1f}"
            print(f"{'ok  ' if ok else 'FAIL'} {secs:6.1f} s (first output {lat:>4} s)  {step.label}"
                  + ("" if ok else f": {why}"), flush=True)
        t0 = time.monotonic()
        why = api_rows_named_for_what_they_run()
        failures += why is not None
        print(f"{'ok  ' if why is None else 'FAIL'} {time.monotonic() - t0:6.1f} s                      "
              f"API: report.rows never calls a QLoRA plan lora" + ("" if why is None else f": {why}"))
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
