"""Hostile-input fuzz of the vramplan CLI and Python API (issue #16): no traceback, no hang, no NaN.

    python benchmarks/fuzz.py                      # 10,000 CLI cases + 2,000 API calls, seed 0
    python benchmarks/fuzz.py --cli 500 --api 200 --seed 3

CLI cases call ``vramplan.cli.main(argv)`` in-process (stdout/stderr captured, SystemExit
caught, a SIGALRM time limit per call); the hang-prone ones (FIFOs, /dev/zero, YAML alias
bombs, catastrophic target regexes) run in a subprocess with a wall-clock limit. Inputs mix
valid and hostile values: huge, negative, float, NaN/inf, unicode and empty numbers; unknown
enums; binary, non-UTF-8, UTF-16, huge, deeply nested, FIFO and directory paths; malformed
config.json, Axolotl/TRL files and calibration logs; corrupted profiles.

Checks per case: no exception escapes ``main`` (a traceback, counted by distinct signature:
exception type + innermost vramplan frame); exit code 0 or 2; an error exit prints exactly
one error line on stderr; ``--json`` output parses as strict JSON (no NaN/Infinity) and holds
no negative byte/time figure; no call over the hang limit; no input file changed; no temporary
file left behind. API calls (estimate, fit, make_config, feasibility_matrix, parse_size,
get_model, read_training_file) with hostile argument types must raise only ``VramplanError``.

Prints: invocations, exit-code distribution, traceback signatures, hangs, invalid JSON
outputs, NaN/negative figures, multi-line errors, changed inputs, temporary files left.
Exit status 1 when any of those is non-zero. The same generators drive tests/test_fuzz.py
(a few hundred cases under hypothesis).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HANG_S = 20.0
#: Share of the hang-prone cases run in a subprocess (the others in-process, under SIGALRM).
SUBPROCESS_SHARE = 0.15
sub_rng = random.Random(12345)
#: A real dry run (meta-device trace of a 0.5-1B model) is work, not a hang: its own limit.
DRYRUN_S = 120.0

# -- hostile files ---------------------------------------------------------------------------

GOOD_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
               "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
               "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}

YAML_BOMB = "\n".join(["a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]"]
                      + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
                      + ["base_model: 7b", "micro_batch_size: 1", "sequence_len: 512", "lora_target_modules: *i"]) + "\n"


def _config(**changes):
    d = dict(GOOD_CONFIG)
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k, None)
        else:
            d[k] = v
    return d


_DROP = object()


def make_files(root: Path) -> dict[str, list[str]]:
    """Write the hostile fixtures under ``root``; return pools of paths by kind."""
    root.mkdir(parents=True, exist_ok=True)
    models, configs, texts, logs, special = [], [], [], [], []

    def w(name: str, data, pool: list | None = None) -> str:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        if pool is not None:
            pool.append(str(p))
        return str(p)

    # config.json variants (raw text so NaN/Infinity survive)
    w("good/config.json", json.dumps(GOOD_CONFIG), models)
    models.append(str(root / "good"))
    bad_values = {
        "nan": '"hidden_size": NaN', "inf": '"num_hidden_layers": Infinity', "ninf": '"vocab_size": -Infinity',
        "str": '"hidden_size": "2048"', "list": '"num_hidden_layers": [22]', "frac": '"hidden_size": 2048.5',
        "huge": '"vocab_size": 1' + "0" * 400, "neg": '"num_attention_heads": -32', "zero_kv": '"num_key_value_heads": 0',
        "bool": '"hidden_size": true', "obj": '"intermediate_size": {"a": 1}', "null": '"hidden_size": null',
        "arch_int": '"architectures": 5', "arch_obj": '"architectures": {"a": 1}', "arch_list": '"architectures": [1, 2]',
        "text_str": '"text_config": "x"', "text_list": '"text_config": [1]', "type_list": '"model_type": ["llama"]',
        "kv_gt": '"num_key_value_heads": 64', "head_dim": '"head_dim": 1e300', "sw": '"sliding_window": "x"',
        "act": '"hidden_act": 7', "cap": '"final_logit_softcapping": "x"', "experts": '"num_local_experts": -8',
        "ept": '"num_experts_per_tok": 1e5', "ctx": '"max_position_embeddings": 1e30', "lt": '"layer_types": 5',
        "tie": '"tie_word_embeddings": "yes"', "bias": '"attention_bias": [1]',
    }
    for name, frag in bad_values.items():
        body = json.dumps(_config(**{k: _DROP for k in ("hidden_size",) if name in ("text_str", "text_list")}))
        w(f"cfg_{name}/config.json", body[:-1] + ", " + frag + "}", models)
    w("utf16/config.json", json.dumps(GOOD_CONFIG).encode("utf-16"), models)
    w("latin1/config.json", b'{"model_type": "llam\xe9", "hidden_size": 2048}', models)
    w("deep/config.json", "[" * 200_000 + "]" * 200_000, models)
    w("deep2/config.json", '{"a":' * 5000 + "1" + "}" * 5000, models)
    w("empty/config.json", "", models)
    w("array/config.json", "[]", models)
    w("big/config.json", '{"x": "' + "a" * (9 << 20) + '"}', models)
    w("bom/config.json", "\ufeff" + json.dumps(GOOD_CONFIG), models)
    (root / "nocfg").mkdir(exist_ok=True)
    models.append(str(root / "nocfg"))
    # Axolotl / TRL files
    ax = "base_model: 7b\nmicro_batch_size: 1\nsequence_len: 512\nadapter: lora\n"
    for name, extra in {
        "ok": "", "r_null": "lora_r: null\n", "alpha_abc": "lora_alpha: abc\n", "drop2": "lora_dropout: 2\n",
        "seq_neg": "sequence_len: -1\n", "seq_inf": "sequence_len: .inf\n", "mb_str": "micro_batch_size: '8'\n",
        "regex_bomb": "lora_target_modules: '(a+)+$'\n", "regex_bomb2": "lora_target_modules: '(.*a){25}'\n",
        "regex_bad": "lora_target_modules: '(['\n", "regex_ok": "lora_target_modules: '.*(q_proj|v_proj)'\n",
        "model_list": "base_model: [1, 2]\n", "adapter_map": "adapter: {a: 1}\n", "ga_str": "gradient_accumulation_steps: '8'\n",
        "tm_int": "lora_target_modules: 5\n", "tm_map": "lora_target_modules: {a: 1}\n", "opt_int": "optimizer: 5\n",
        "alpha_nan": "lora_alpha: .nan\n", "rl": "rl: kto\n", "huge_r": "lora_r: 1" + "0" * 300 + "\n",
        "tabs": "\tbad: [\n", "dup": "base_model: {a: *x}\n", "bf16": "bf16: [1]\n",
    }.items():
        w(f"ax_{name}.yaml", ax + extra, configs)
    w("bomb.yaml", YAML_BOMB, configs)
    w("deep.yaml", "a: " + "[" * 50_000 + "]" * 50_000 + "\n", configs)
    w("binary.yaml", bytes(range(256)) * 4, configs)
    w("utf16.yaml", ax.encode("utf-16"), configs)
    trl = {"model_name_or_path": "7b", "per_device_train_batch_size": 1, "use_peft": True}
    for name, extra in {"ok": {}, "r_null": {"lora_r": None}, "alpha_abc": {"lora_alpha": "abc"},
                        "optim_int": {"optim": 5}, "max_len_bool": {"max_length": True}, "bs_float": {"per_device_train_batch_size": 2.5},
                        "bs_huge": {"per_device_train_batch_size": 10**40}, "model_int": {"model_name_or_path": 7},
                        "tm_regex": {"lora_target_modules": "(a|a)*b"}, "drop_neg": {"lora_dropout": -1}}.items():
        w(f"trl_{name}.json", json.dumps({**trl, **extra}), configs)
    w("trl_nan.json", json.dumps(trl)[:-1] + ', "lora_alpha": NaN}', configs)
    # preamble / generic text
    w("preamble.md", "# hello\n\nsome text\n", texts)
    w("preamble_latin1.md", b"caf\xe9\n", texts)
    w("preamble_big.md", "x" * (2 << 20), texts)
    # calibration logs (a .json name checks that --fit-only never overwrites its input)
    w("log_empty.jsonl", "", logs)
    w("log_session.json", '{"kind": "session", "session": "a"}\n', logs)
    w("log_deep.jsonl", '{"kind": "point", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n", logs)
    w("log_binary.jsonl", bytes(range(256)), logs)
    w("log_torn.jsonl", '{"kind": "session"}\n{"kind": "po', logs)
    w("log_mid.jsonl", '{"kind": "session"}\nnot json\n{"kind": "session"}\n', logs)
    w("log_nan.jsonl", '{"kind": "point", "status": "ok", "step_s_median": NaN}\n', logs)
    # special files: FIFO, device, directory, missing, NUL in the name
    fifo = root / "fifo"
    if not fifo.exists() and hasattr(os, "mkfifo"):
        os.mkfifo(fifo)
    special += [str(fifo), "/dev/zero", "/dev/null", str(root), str(root / "missing.json"), "/bin/ls" if Path("/bin/ls").exists() else str(root / "missing")]
    # corrupted profiles (one directory each, found through VRAMPLAN_PROFILES as rtx4090.json)
    profiles = []
    for name, data in {"binary": bytes(range(256)), "utf16": json.dumps({"schema": 1}).encode("utf-16"),
                       "deep": "[" * 100_000 + "]" * 100_000, "empty": "", "list": "[]", "obj": "{}",
                       "nan": '{"schema": 1, "context_bytes": NaN}', "garbage": '{"gpu": 5, "throughput": "x"}',
                       "huge": '{"schema": 1, "context_bytes": 1' + "0" * 300 + "}"}.items():
        d = root / f"prof_{name}"
        w(f"prof_{name}/rtx4090.json", data)
        profiles.append(str(d))
    ro = root / "readonly"
    ro.mkdir(exist_ok=True)
    os.chmod(ro, 0o555)
    return {"models": models, "configs": configs, "texts": texts, "logs": logs, "special": special,
            "profiles": profiles, "out": [str(root / "out"), str(ro), "/proc/nope", str(root / "good" / "config.json")]}


# -- argument generators ---------------------------------------------------------------------

INTS_BAD = ["0", "-1", "-0", "2.5", "1e3", "nan", "inf", "-inf", "", " ", "99999999999999999999999999", "1" + "0" * 400,
            "0x10", "1_000", "٣", "４", "1k", "k", "--", "None", "true", "1e309", "7b", "\x00", "１２"]
FLOATS_BAD = ["nan", "NaN", "inf", "-inf", "1e309", "-1", "2", "1", "", "abc", "0x1p3", "1e-400", "-0.0", "∞", "1" + "0" * 400]
NAMES_BAD = ["", " ", "garbage", "ｌｏｒａ", "a" * 5000, "\x00", "../../etc/passwd", "None", "'; rm -rf /", "ä", "0",
             "-", "all", ",", ",,,", "lora,", "+", "dpo+", "dpo+nope"]
MODELS = ["7b", "1b", "3b", "13b", "llama-2-7b", "llama-3.1-8b", "mistral-7b", "qwen2.5-0.5b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
GPUS = ["rtx4090", "rtx3090", "a100-80gb", "h100", "rtx4000ada", "t4", "v100-32gb", "l4"]
METHODS = ["full", "lora", "qlora", "dora", "ia3", "dpo", "ppo"]
ADAPTERS = ["full", "lora", "qlora", "dora", "ia3"]
PRECISIONS = ["bf16", "bf16-mixed", "fp16-mixed", "fp32", "fp16"]
ATTN = ["eager", "sdpa", "flash", "xformers"]
OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor", "lion", "paged_adamw_32bit"]
FRAMEWORKS = ["hf", "torchtune", "unsloth", "litgpt", "deepspeed"]
TECHS = ["chunked_ce", "liger_ce", "act_offload", "selective_ckpt", "opt_in_bwd", "opt_offload", "padding",
         "chunked_ce,liger_ce", "liger_ce,act_offload", "bogus"]
STRATEGIES = ["ddp", "zero1", "zero2", "zero3", "fsdp", "none", "tp"]
SIZES = ["24", "24GiB", "80GB", "16000MiB", "0", "-1", "1e400", "lots", "1e30", "24 TB", "0.000001", "48gib", "1PiB"]


@dataclass
class Case:
    argv: list[str]
    hang_prone: bool = False
    env: dict = field(default_factory=dict)
    kind: str = "cli"


def _pick(rng: random.Random, good: list, bad: list, p_good: float = 0.75):
    return rng.choice(good) if rng.random() < p_good else rng.choice(bad)


def gen_case(rng: random.Random, files: dict[str, list[str]]) -> Case:
    """One CLI invocation, valid and hostile values mixed."""
    r = rng.random()
    hostile_paths = files["special"] + files["models"]
    hang = False
    env: dict = {}

    def ival(good):
        return _pick(rng, [str(x) for x in good], INTS_BAD)

    def fval(good):
        return _pick(rng, [str(x) for x in good], FLOATS_BAD)

    def nval(good):
        return _pick(rng, good, NAMES_BAD)

    if r < 0.36:
        sub = "estimate"
    elif r < 0.50:
        sub = "fit"
    elif r < 0.62:
        sub = "matrix"
    elif r < 0.65:
        sub = "dryrun"
    elif r < 0.74:
        sub = "calibrate"
    elif r < 0.79:
        sub = rng.choice(["models", "gpus", "methods"])
    elif r < 0.90:
        sub = "config"
    elif r < 0.95:
        sub = "garbage"
    else:
        sub = "profile"

    if sub == "garbage":
        pool = ["--version", "--help", "", "estimatex", "-x", "--", "\x00", "fit --", "matrix --seq", "estimate --model",
                "estimate --model 7b --seq", "estimate --model 7b extra", "estimate --model=7b --batch=", "-h fit"]
        return Case(rng.choice(pool).split(" ") if rng.random() < 0.8 else [rng.choice(pool)])
    if sub in ("models", "gpus", "methods"):
        return Case([sub] + (["--json"] if rng.random() < 0.5 and sub != "methods" else [])
                    + ([rng.choice(["--bogus", "x"])] if rng.random() < 0.2 else []))
    argv: list[str] = []
    if sub in ("estimate", "fit", "dryrun", "config", "profile"):
        argv = ["estimate" if sub in ("config", "profile") else sub]
        if sub == "config":
            cfg = rng.choice(files["configs"] + files["special"][:3])
            argv += ["--config", cfg]
            hang = "bomb" in cfg or "regex" in cfg or cfg in files["special"][:3]
            if rng.random() < 0.3:
                argv += ["--model", rng.choice(MODELS + files["models"][:3])]
        elif rng.random() < 0.85:
            m = _pick(rng, MODELS, hostile_paths + NAMES_BAD, 0.7)
            hang = m in files["special"]
            argv += ["--model", m]
        if sub == "profile":
            env = {"VRAMPLAN_PROFILES": rng.choice(files["profiles"])}
            argv += ["--gpu", "rtx4090"]
        opts = {
            "--method": lambda: nval(METHODS + ["dpo", "ppo"]), "--adapter": lambda: nval(ADAPTERS),
            "--batch": lambda: ival([1, 2, 4, 8]), "--gpu": lambda: nval(GPUS + ["auto"]),
            "--gpu-mem": lambda: _pick(rng, SIZES[:4], SIZES), "--seq": lambda: ival([512, 1024, 2048, "4k", "32k", 8192]),
            "--rank": lambda: ival([4, 8, 16, 64]), "--targets": lambda: nval(["q_proj,v_proj", "all-linear", "q_proj", "q_prj"]),
            "--precision": lambda: nval(PRECISIONS), "--attn": lambda: nval(ATTN), "--alpha": lambda: fval([8, 16, 0.5]),
            "--dropout": lambda: fval([0, 0.05, 0.1]), "--optimizer": lambda: nval(OPTIMIZERS),
            "--grad-accum": lambda: ival([1, 2, 8, 2048]), "--ppo-response": lambda: ival([64, 256]),
            "--framework": lambda: nval(FRAMEWORKS), "--techniques": lambda: nval(TECHS),
            "--gpus": lambda: ival([1, 2, 4]), "--strategy": lambda: nval(STRATEGIES),
            "--offload": lambda: nval(["cpu", "none"]), "--global-batch": lambda: ival([8, 16, 64]),
            "--tokens": lambda: nval(["500M", "2B", "1e9", "-1", "nan", "1e400", "1e30", "0"]),
            "--epochs": lambda: fval([1, 3, 0.5]), "--margin": lambda: fval([0.1, 0.15, 0.5]), "--top": lambda: ival([0, 3, 50]),
        }
        allowed = list(opts)
        if sub == "fit":
            allowed = [k for k in allowed if k not in ("--method", "--adapter", "--alpha", "--dropout", "--grad-accum",
                                                      "--ppo-response")]
        elif sub == "dryrun":
            allowed = [k for k in allowed if k not in ("--gpus", "--strategy", "--offload", "--global-batch", "--tokens",
                                                      "--epochs", "--margin", "--top")]
        else:
            allowed = [k for k in allowed if k not in ("--margin", "--top")]
        if sub == "fit" and rng.random() < 0.8:
            argv += ["--gpu", rng.choice(GPUS)]
        if sub == "fit":
            argv += ["--gpus", rng.choice(["1", "1", "2"])]  # keep the strategy search small
        if sub == "dryrun":
            # a real meta-device trace takes seconds: keep most dry runs to argument errors
            if rng.random() < 0.9:  # values every flag refuses
                argv += [rng.choice(["--batch", "--seq", "--rank", "--grad-accum"]),
                         rng.choice(["0", "-1", "nan", "", "abc", "1" + "0" * 400, "2.5", "inf"])]
            else:
                argv = ["dryrun", "--model", rng.choice(["qwen2.5-0.5b", "1b"]), "--seq", rng.choice(["64", "128"]),
                        "--grad-accum", rng.choice(["1", "4", "2048"])] + (["--json"] if rng.random() < 0.5 else [])
                return Case(argv, kind="dryrun")  # real work (a meta-device trace): in-process, a longer limit
        for k in rng.sample(allowed, rng.randint(0, 5)):
            if k in ("--gpus",) and sub == "fit":
                continue
            argv += [k, opts[k]()]
        if rng.random() < 0.3:
            argv.append("--json")
        if rng.random() < 0.05:
            argv += [rng.choice(["--grad-ckpt", "--no-grad-ckpt", "--no-double-quant"])]
        return Case(argv, hang_prone=hang, env=env)
    if sub == "matrix":
        argv = ["matrix", "--models", _pick(rng, ["7b", "1b,3b", "7b,13b", "llama-3.1-8b"], NAMES_BAD + ["all"] + files["models"][:4], 0.8),
                "--gpus", _pick(rng, ["rtx4090", "rtx3090,a100-80gb", "24GiB", "24GiB,80GiB"], NAMES_BAD + ["all", "24", "1e400GiB"], 0.8)]
        opts = {"--methods": lambda: nval(["lora", "qlora,dpo+qlora", "all", "full,lora"]),
                "--seq": lambda: _pick(rng, ["2048", "512,1024", "4k,8k"], INTS_BAD + [",".join(str(i) for i in range(1, 200)), "1,0", "4k,nan"]),
                "--batch": lambda: ival([1, 2, 8, 1024, 1025]), "--rank": lambda: ival([8, 16]),
                "--precision": lambda: nval(PRECISIONS + ["garbage"]), "--attn": lambda: nval(ATTN),
                "--framework": lambda: nval(FRAMEWORKS), "--techniques": lambda: nval(TECHS),
                "--format": lambda: nval(["md", "csv", "md,csv", "html", "png", "json", "md,pdf"]),
                "--targets": lambda: nval(["q_proj,v_proj", "all-linear"])}
        for k in rng.sample(list(opts), rng.randint(0, 4)):
            argv += [k, opts[k]()]
        if rng.random() < 0.35:
            out = rng.choice(files["out"])
            argv += ["--out", out, "--format", rng.choice(["md", "csv", "md,csv,html"])]
            if rng.random() < 0.5:
                argv += ["--name", _pick(rng, ["feasibility", "run1"], ["../x", "a/b", ".hidden", "..", "", "/abs", "x" * 300])]
            if rng.random() < 0.5:
                pre = rng.choice(files["texts"] + files["special"])
                argv += ["--preamble", pre]
                hang = hang or pre in files["special"]
        elif rng.random() < 0.2:
            argv.append("--json")
        return Case(argv, hang_prone=hang)
    # calibrate: only --fit-only or bad flags (never real measuring)
    log = rng.choice(files["logs"] + files["special"] + files["models"][:2])
    argv = ["calibrate", "--fit-only", log]
    if rng.random() < 0.5:
        argv += ["--report-dir", rng.choice(files["out"])]
    if rng.random() < 0.3:
        argv += ["--no-report"]
    if rng.random() < 0.2:
        argv += ["--time-limit", fval([10, 60])]
    if rng.random() < 0.2:
        argv += ["--json"]
    return Case(argv, hang_prone=log in files["special"])


# -- running and checking --------------------------------------------------------------------

class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def _signature(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in tb if "vramplan" in f.filename] or tb
    last = frames[-1] if frames else None
    where = f"{Path(last.filename).name}:{last.lineno}" if last else "?"
    return f"{type(exc).__name__} at {where}"


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    seconds: float
    traceback: str | None = None
    hang: bool = False


def run_inprocess(argv: list[str], limit: float = HANG_S) -> Outcome:
    from vramplan.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    t0 = time.perf_counter()
    rc, sig = None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except _Hang:
        signal.setitimer(signal.ITIMER_REAL, 0)
        return Outcome(None, out.getvalue(), err.getvalue(), time.perf_counter() - t0, hang=True)
    except BaseException as exc:  # noqa: BLE001 - the fuzz counts every escape
        sig = _signature(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return Outcome(rc, out.getvalue(), err.getvalue(), time.perf_counter() - t0, traceback=sig)


def run_subprocess(argv: list[str], env: dict, limit: float = HANG_S) -> Outcome:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "vramplan", *argv], capture_output=True, text=True, timeout=limit,
                           env={**os.environ, "PYTHONPATH": str(ROOT), **env}, errors="replace")
    except subprocess.TimeoutExpired as exc:
        return Outcome(None, "", "", time.perf_counter() - t0, hang=True)
    sig = None
    if "Traceback (most recent call last)" in p.stderr:
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        files = [l for l in lines if l.strip().startswith("File ") and "vramplan" in l]
        sig = f"{lines[-1].split(':')[0]} at {files[-1].strip() if files else '?'} (subprocess)"
    return Outcome(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0, traceback=sig)


#: Progress lines on stderr when piped (vramplan.render.ProgressBar / Elapsed): not error lines.
_PROGRESS = re.compile(r"^[\w .+-]+: \d+/\d+ \(\d+ s|^\.\.\. still running|^[\w .+-]+ \.\.\.$")

_NONNEG_KEYS = ("bytes", "_s", "seconds", "tokens_per_s", "gpu_hours", "params", "capacity")


def _bad_numbers(obj, path="") -> list[str]:
    """NaN/inf anywhere, or a negative value under a byte/time/count key."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _bad_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:5000]):
            bad += _bad_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(f"{path}={obj}")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj < 0:
        key = path.rsplit(".", 1)[-1]
        if any(key.endswith(s) for s in _NONNEG_KEYS) and not any(w in key for w in ("headroom", "saving", "delta", "margin")):
            bad.append(f"{path}={obj}")
    return bad


def _reject_constant(tok):
    raise ValueError(f"non-JSON constant {tok}")


@dataclass
class Tally:
    cases: int = 0
    subprocess_cases: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    tracebacks: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)
    hangs: list = field(default_factory=list)
    invalid_json: list = field(default_factory=list)
    bad_numbers: list = field(default_factory=list)
    multi_line: list = field(default_factory=list)
    bad_codes: list = field(default_factory=list)
    changed_inputs: list = field(default_factory=list)
    slowest: tuple = (0.0, None)

    def failures(self) -> int:
        return (sum(self.tracebacks.values()) + len(self.hangs) + len(self.invalid_json) + len(self.bad_numbers)
                + len(self.multi_line) + len(self.bad_codes) + len(self.changed_inputs))


def _snapshot(argv: list[str], root: Path) -> dict:
    snap = {}
    for a in argv:
        try:
            p = Path(a)
            if str(p).startswith(str(root)) and p.is_file() and p.stat().st_size < (1 << 20):
                snap[a] = hashlib.sha1(p.read_bytes()).hexdigest()
        except (OSError, ValueError):
            pass
    return snap


def check_case(case: Case, root: Path, tally: Tally) -> Outcome:
    before = _snapshot(case.argv, root)
    # hang-prone cases (FIFO, /dev/zero, alias bombs, catastrophic regexes) in a subprocess with a wall-clock
    # limit -- a sample of them, for speed; the rest in-process under SIGALRM like every other case
    if case.hang_prone and not any("\x00" in a for a in case.argv) and sub_rng.random() < SUBPROCESS_SHARE:
        res = run_subprocess(case.argv, case.env)
        tally.subprocess_cases += 1
    else:
        saved = {k: os.environ.get(k) for k in case.env}
        os.environ.update(case.env)
        try:
            res = run_inprocess(case.argv, limit=DRYRUN_S if case.kind == "dryrun" else HANG_S)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    tally.cases += 1
    tally.codes["hang" if res.hang else ("traceback" if res.traceback else res.rc)] += 1
    if res.seconds > tally.slowest[0]:
        tally.slowest = (res.seconds, case.argv)
    shown = " ".join(case.argv)[:300]
    if res.hang:
        tally.hangs.append(shown)
        return res
    if res.traceback:
        tally.tracebacks[res.traceback] += 1
        tally.examples.setdefault(res.traceback, shown)
        return res
    if res.rc not in (0, 2):
        tally.bad_codes.append(f"rc={res.rc}: {shown}")
    errs = [l for l in res.err.splitlines() if l.strip() and not l.startswith("vramplan: warning:")
            and not _PROGRESS.match(l)]
    if res.rc == 2 and len(errs) != 1:
        tally.multi_line.append(f"{len(errs)} lines: {shown} :: {res.err[:300]!r}")
    if res.rc == 0 and "--json" in case.argv and "--help" not in case.argv:
        try:
            data = json.loads(res.out, parse_constant=_reject_constant)
        except ValueError as exc:
            tally.invalid_json.append(f"{shown} :: {exc}")
        else:
            bad = _bad_numbers(data)
            if bad:
                tally.bad_numbers.append(f"{shown} :: {bad[:3]}")
    elif res.rc == 0:
        if "NaN" in res.out.split() or " nan " in res.out or "inf GiB" in res.out:
            tally.bad_numbers.append(f"{shown} :: NaN/inf in text output")
    after = _snapshot(case.argv, root)
    for k, v in before.items():
        if after.get(k) != v:
            tally.changed_inputs.append(f"{k} changed by: {shown}")
    return res


# -- API fuzz --------------------------------------------------------------------------------

HOSTILE_VALUES = [None, "false", "true", "", "garbage", float("nan"), float("inf"), -1, 0, 10**400, 2.5, -0.0,
                  [], {}, (), object(), b"bytes", True, False, "7b", "rtx4090", 3, 8, 2048, "24GiB", ["q_proj"],
                  "a" * 10_000, "\x00", 1e300, -10**30]


def gen_api_call(rng: random.Random):
    """(label, callable) for one Python API call with hostile arguments."""
    import numpy as np

    import vramplan
    from vramplan.config import make_config
    from vramplan.gpus import get_gpu
    from vramplan.matrix import feasibility_matrix
    from vramplan.models import from_hf_config, get_model
    from vramplan.units import parse_size

    vals = HOSTILE_VALUES + [np.int64(4), np.float64("nan"), np.bool_(True)]

    def v(good):
        return rng.choice(good) if rng.random() < 0.6 else rng.choice(vals)

    est_kw = {"batch": [1, 2], "seq": [512, 2048], "grad_accum": [1, 4], "rank": [8, 16], "alpha": [8.0, 16],
              "dropout": [0.0, 0.1], "targets": [None, "q_proj,v_proj", ["q_proj"]], "grad_ckpt": [None, True, False],
              "optimizer": ["adamw", "adamw_8bit"], "precision": [None, "bf16-mixed"], "attn": ["sdpa", "eager"],
              "framework": ["hf", "torchtune"], "techniques": [None, "chunked_ce"], "double_quant": [True, False],
              "gpu": [None, "rtx4090"], "gpu_mem": [None, "24GiB", 24 * 2**30], "gpus": [1, 2], "strategy": [None, "zero3"],
              "offload": [None, "none"], "global_batch": [None, 8], "tokens": [None, "1B"], "epochs": [1.0, 2]}
    kind = rng.random()
    if kind < 0.45:
        kw = {k: v(g) for k, g in rng.sample(list(est_kw.items()), rng.randint(1, 4))}
        args = (v(["7b", "1b"]), v(["lora", "qlora", "full"]))
        return f"estimate{args!r:.60}{sorted(kw)}", lambda: vramplan.estimate(*args, **kw)
    if kind < 0.55:
        goods = {"seq": [512, 2048], "batch": [None, 1], "rank": [None, 8], "attn": [None, "sdpa"],
                 "optimizer": [None, "adamw"], "grad_ckpt": [None, True], "margin": [None, 0.1], "top": [20, 5],
                 "epochs": [1.0], "precision": [None, "bf16-mixed"]}
        kw = {k: v(goods[k]) for k in rng.sample(list(goods), rng.randint(1, 3))}
        args = (v(["7b", "1b"]), v(["rtx4090", "a100-80gb"]))
        return f"fit{sorted(kw)}", lambda: vramplan.fit(*args, **kw)
    if kind < 0.70:
        kw = {k: v(g) for k, g in rng.sample(list(est_kw.items())[:14], rng.randint(1, 4))
              if k not in ("gpu", "gpu_mem")}
        m = v(["7b", "1b"])
        return f"make_config{sorted(kw)}", lambda: make_config(m, v(["lora", "full"]), **kw)
    if kind < 0.78:
        kw = {"batch": v([1, 2]), "rank": v([8]), "attn": v(["sdpa"]), "precision": v([None, "bf16"])}
        args = (v(["7b", "1b,3b"]), v(["lora", "all"]), v(["rtx4090", "24GiB"]), v([2048, "512,1024"]))
        return "feasibility_matrix", lambda: feasibility_matrix(*args, **kw)
    if kind < 0.85:
        x = rng.choice(vals + ["24", "24GiB", "1e400GiB", "-5GB", "nanGiB"])
        return f"parse_size({x!r:.40})", lambda: parse_size(x)
    if kind < 0.92:
        cfg = dict(GOOD_CONFIG)
        for k in rng.sample(list(cfg) + ["text_config", "head_dim", "num_local_experts", "sliding_window"], rng.randint(1, 3)):
            cfg[k] = rng.choice(vals)
        return "from_hf_config", lambda: from_hf_config(cfg)
    x = rng.choice(vals)
    fn = rng.choice([get_model, get_gpu])
    return f"{fn.__name__}({x!r:.40})", lambda: fn(x)


def check_api(rng: random.Random, tally: Tally, errs=None) -> None:
    from vramplan.errors import VramplanError

    label, call = gen_api_call(rng)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    tally.cases += 1
    try:
        res = call()
        data = _api_json(res)
        if data is not None:
            bad = _bad_numbers(data)
            if bad:
                tally.bad_numbers.append(f"{label} :: {bad[:3]}")
        tally.codes["ok"] += 1
    except VramplanError as exc:
        tally.codes["VramplanError"] += 1
        if "\n" in str(exc):
            tally.multi_line.append(f"{label} :: {str(exc)[:200]!r}")
    except _Hang:
        tally.hangs.append(label)
    except Exception as exc:  # noqa: BLE001
        sig = _signature(exc)
        tally.codes[type(exc).__name__] += 1
        tally.tracebacks[sig] += 1
        tally.examples.setdefault(sig, label)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)



def _api_json(res):
    from vramplan.results import jsonable

    if not hasattr(res, "to_json"):  # figures: Estimate, FitReport, FeasibilityMatrix (not a parsed ModelSpec)
        return None
    try:
        text = json.dumps(jsonable(res), allow_nan=False)
    except ValueError:
        return {"non_finite": float("nan")}
    except TypeError:
        return None
    return json.loads(text)


# -- main ------------------------------------------------------------------------------------

def report(name: str, t: Tally, seconds: float) -> None:
    print(f"== {name}: {t.cases} invocations in {seconds:.0f} s ({t.subprocess_cases} in a subprocess)")
    print("exit codes / outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(t.codes.items(), key=lambda kv: -kv[1])))
    print(f"tracebacks: {sum(t.tracebacks.values())} ({len(t.tracebacks)} distinct signatures)")
    for sig, n in t.tracebacks.most_common(40):
        print(f"  {n:5d}  {sig}   e.g. {t.examples[sig]}")
    for title, found, shown in ((f"hangs over {HANG_S:.0f} s", t.hangs, 10), ("invalid JSON outputs", t.invalid_json, 5),
                                ("NaN/inf/negative figures", t.bad_numbers, 5),
                                ("errors not on one line", t.multi_line, 5),
                                ("exit codes other than 0/2", t.bad_codes, 5), ("inputs changed", t.changed_inputs, 5)):
        print(f"{title}: {len(found)}")
        for h in found[:shown]:
            print(f"  {h}")
    if t.slowest[1]:
        print(f"slowest call: {t.slowest[0]:.1f} s: {' '.join(t.slowest[1])[:200]}")


def leftover_temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".tmp" in p.name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cli", type=int, default=10_000, help="CLI invocations (default 10,000)")
    ap.add_argument("--api", type=int, default=2_000, help="Python API calls (default 2,000)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="vramplan-fuzz-") as tmp:
        root = Path(tmp)
        files = make_files(root / "in")
        cwd = os.getcwd()
        os.chdir(root)  # calibrate's default --out and the profile search stay inside the sandbox
        try:
            rng = random.Random(a.seed)
            cli, t0 = Tally(), time.perf_counter()
            for i in range(a.cli):
                check_case(gen_case(rng, files), root, cli)
                if (i + 1) % 1000 == 0:
                    print(f"... {i + 1} CLI cases, {cli.failures()} failures, {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr, flush=True)
            cli_s = time.perf_counter() - t0
            api, t1 = Tally(), time.perf_counter()
            errs: collections.Counter = collections.Counter()
            for _ in range(a.api):
                check_api(rng, api, errs)
            api_s = time.perf_counter() - t1
        finally:
            os.chdir(cwd)
            os.chmod(root / "in" / "readonly", 0o755)
        left = leftover_temp_files(root)
    report("CLI", cli, cli_s)
    report("API", api, api_s)
    print(f"temporary files left: {len(left)}" + (f" e.g. {left[:3]}" if left else ""))
    return 1 if cli.failures() or api.failures() or left else 0


if __name__ == "__main__":
    sys.exit(main())
