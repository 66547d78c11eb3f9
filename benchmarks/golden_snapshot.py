"""Golden snapshot of what the planner prints, to prove a refactoring preserves behaviour.

Records, in one JSON-lines file, the exact stdout and exit code of the CLI (run in-process) for:

* ``estimate --json`` for every catalogue model x method x three shapes x two cards;
* ``fit --json`` for a dozen everyday questions;
* ``matrix --format csv`` for the feasibility report's grid (RTX 3080 and RTX 4000 Ada).

Usage::

    python benchmarks/golden_snapshot.py --out reports/golden/snapshot.jsonl.gz     # record
    python benchmarks/golden_snapshot.py --check reports/golden/snapshot.jsonl.gz   # compare

``--check`` prints every invocation whose output differs (the first differing JSON keys for
``--json`` outputs), a count of identical/different/missing cases, and exits 1 when any differ.
A difference is not necessarily a defect: a change that fixes a bug must be listed with its
reason in the change's note. The snapshot is deterministic (no timing, no randomness).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("full", "lora", "qlora", "dora", "ia3", "dpo", "ppo")
SHAPES = (("--batch", "1", "--seq", "512"), ("--batch", "2", "--seq", "2048", "--grad-ckpt"),
          ("--batch", "1", "--seq", "8192", "--grad-ckpt"))
CARDS = ("rtx4000ada", "h100-sxm")
FIT_CASES = (
    ("--model", "13b", "--gpu", "rtx4000ada"),
    ("--model", "7b", "--gpu", "rtx4090"),
    ("--model", "llama-3.1-8b", "--gpu", "rtx3090", "--seq", "4096"),
    ("--model", "3b", "--gpu", "rtx3090", "--framework", "torchtune"),
    ("--model", "mistral-7b-v0.3", "--gpu", "rtx4090"),
    ("--model", "llama-3-8b", "--gpu", "rtx4090", "--seq", "8192"),
    ("--model", "llama-3-8b", "--gpu", "rtx4090", "--framework", "torchtune", "--techniques", "act_offload"),
    ("--model", "70b", "--gpu", "rtx4090", "--gpus", "2"),
    ("--model", "1b", "--gpu", "rtx3080"),
    ("--model", "qwen2.5-7b", "--gpu", "l4", "--seq", "1024"),
    ("--model", "gemma-2-9b", "--gpu", "a100-80gb"),
    ("--model", "mixtral-8x7b", "--gpu", "h100-sxm"),
)


def cases() -> list[list[str]]:
    """Every invocation of the snapshot, in a fixed order."""
    from vramplan.models import catalogue

    out: list[list[str]] = []
    for name in sorted(catalogue()):
        for method in METHODS:
            for shape in SHAPES:
                for card in CARDS:
                    out.append(["estimate", "--model", name, "--method", method, "--gpu", card, *shape, "--json"])
    out += [["fit", *c, "--json"] for c in FIT_CASES]
    out.append(["matrix", "--models", "all", "--methods", "all", "--gpus", "rtx3080,rtx4000ada", "--seq", "2048",
                "--format", "csv"])
    return out


def run(argv: list[str]) -> dict:
    """Run the CLI in this process; the matrix writes its csv to a temporary folder, read back."""
    from vramplan.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    extra: list[str] = []
    tmp = None
    if argv[0] == "matrix":
        tmp = tempfile.TemporaryDirectory()
        extra = ["--out", tmp.name, "--name", "golden"]
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            rc = main(argv + extra)
        except SystemExit as exc:  # a CLI that exits instead of returning
            rc = exc.code if isinstance(exc.code, int) else 1
    text = stdout.getvalue()
    if tmp is not None:
        csv = Path(tmp.name) / "golden.csv"
        text = csv.read_text() if csv.exists() else text
        tmp.cleanup()
    return {"argv": argv, "rc": rc, "stdout": text}


def _first_diffs(a, b, path="", limit=5) -> list[str]:
    """Paths of the first differing leaves of two JSON values."""
    if type(a) is not type(b):
        return [f"{path or '.'}: {a!r:.60} -> {b!r:.60}"]
    if isinstance(a, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}.{k}: {'added' if k not in a else 'removed'}")
            elif a[k] != b[k]:
                out += _first_diffs(a[k], b[k], f"{path}.{k}", limit)
            if len(out) >= limit:
                break
        return out[:limit]
    if isinstance(a, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                out += _first_diffs(x, y, f"{path}[{i}]", limit)
            if len(out) >= limit:
                break
        return out[:limit]
    return [f"{path or '.'}: {a!r:.60} -> {b!r:.60}"] if a != b else []


def describe(old: dict, new: dict) -> str:
    if old["rc"] != new["rc"]:
        return f"exit {old['rc']} -> {new['rc']}"
    try:
        return "; ".join(_first_diffs(json.loads(old["stdout"]), json.loads(new["stdout"])))
    except ValueError:
        a, b = old["stdout"].splitlines(), new["stdout"].splitlines()
        changed = sum(1 for x, y in zip(a, b) if x != y) + abs(len(a) - len(b))
        return f"{changed} of {len(a)} lines differ"


def _write(path: Path, text: str) -> None:
    """Write the snapshot atomically, gzip-compressed (mtime 0: byte-reproducible) when its name ends in .gz."""
    data = gzip.compress(text.encode(), mtime=0) if path.suffix == ".gz" else text.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if path.suffix == ".gz" else data).decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="record the snapshot into this JSON-lines file")
    g.add_argument("--check", help="compare the current outputs with this snapshot")
    args = ap.parse_args()
    todo = cases()
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, "".join(json.dumps(run(argv), sort_keys=True) + "\n" for argv in todo))
        print(f"{len(todo)} invocations recorded in {path}")
        return 0
    old = {tuple(r["argv"]): r for r in map(json.loads, _read(Path(args.check)).splitlines())}
    same = differ = missing = 0
    for argv in todo:
        ref = old.get(tuple(argv))
        if ref is None:
            missing += 1
            print("NEW     ", " ".join(argv))
            continue
        now = run(argv)
        if now["rc"] == ref["rc"] and now["stdout"] == ref["stdout"]:
            same += 1
        else:
            differ += 1
            print("DIFFERS ", " ".join(argv), "::", describe(ref, now))
    gone = len(set(old) - {tuple(a) for a in todo})
    print(f"identical {same}, different {differ}, new {missing}, no longer run {gone}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
