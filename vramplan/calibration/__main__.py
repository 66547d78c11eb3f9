"""``python -m vramplan.calibration``: the calibrate command, usable before the CLI wires it.

The options are those of ``vramplan calibrate``; :func:`add_arguments` fills any argparse
parser with them and :func:`run_from_args` maps the parsed options onto the library calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import VramplanError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", default="auto", help="card name for the profile (auto: NVML, matched to the catalogue)")
    p.add_argument("--suite", default=None,
                   help="suite name in calibrate/ (standard, quick, cpu) or a .toml path (default: standard)")
    p.add_argument("--out", default="profiles", help="directory of <gpu>.jsonl (raw log) and <gpu>.json (profile)")
    p.add_argument("--resume", action="store_true", help="continue an existing log, skipping measured points")
    p.add_argument("--quick", action="store_true", help="the few-minute subset")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (tiny models: time and dry-run accounting)")
    p.add_argument("--report-dir", default="reports/calibration", help="where <gpu>.md and <gpu>.png go")
    p.add_argument("--no-report", action="store_true", help="do not write the report")
    p.add_argument("--no-dryrun", action="store_true", help="skip the dry-run accounting of each point")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new point after this long; fit what is logged (resume later with --resume)")
    p.add_argument("--fit-only", metavar="LOG", default=None,
                   help="refit the profile and rewrite the report from an existing JSONL log; measure nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run_from_args(args: argparse.Namespace) -> dict:
    from .fit import fit_profile
    from .report import write_report
    from .runner import run_calibration

    report_dir = None if args.no_report else args.report_dir
    if args.fit_only:
        log = Path(args.fit_only)
        prof = fit_profile(log)
        path = prof.save(log.with_suffix(".json"))
        rep = write_report(log, prof, report_dir) if report_dir else (None, None)
        return {"gpu": prof.gpu, "log": str(log), "profile": str(path),
                "report": str(rep[0]) if rep[0] else None, "plot": str(rep[1]) if rep[1] else None,
                "holdout": {k: r.to_json() for k, r in prof.holdout.items()}}
    res = run_calibration(gpu=args.gpu, suite=args.suite, out=args.out, resume=args.resume, quick=args.quick,
                          device=args.device, report_dir=report_dir, progress=not args.no_progress,
                          dryrun=False if args.no_dryrun else None, time_limit_s=args.time_limit)
    out = res.to_json()
    if res.profile is not None:
        out["holdout"] = {k: r.to_json() for k, r in res.profile.holdout.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vramplan.calibration",
                                description="Run real steps of every method, fit the card's profile, write the report.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        out = run_from_args(args)
    except VramplanError as exc:
        print(f"vramplan calibrate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"log:     {out.get('log')}")
        print(f"profile: {out.get('profile')}")
        if out.get("report"):
            print(f"report:  {out['report']}" + (f" (plot {out['plot']})" if out.get("plot") else ""))
        for k, r in (out.get("holdout") or {}).items():
            if r.get("n"):
                print(f"held out {k}: n={r['n']} median |err| {100 * (r['median_abs_rel'] or 0):.1f}%, "
                      f"worst under {100 * (r['max_under_rel'] or 0):.1f}%")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
