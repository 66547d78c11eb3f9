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
    p.add_argument("--dryrun", choices=("all", "first", "none"), default=None,
                   help="record the dry run's accounting of all points, the first of each model x method group, "
                        "or none (default: the suite's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ..validate import arg_real

    p.add_argument("--time-limit", type=arg_real("time-limit", lo=0.0, lo_open=True), default=None, metavar="SECONDS",
                   help="start no new point after this long; fit what is logged (resume later with --resume)")
    p.add_argument("--fit-only", metavar="LOG", default=None,
                   help="refit the profile and rewrite the report from an existing JSONL log; measure nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--retry-failed", action="store_true",
                   help="with --resume, measure again the points that crashed the device or the process")


    # importers (vramplan.measurements.importers): published tables and logs from any machine
    p.add_argument("--import", dest="import_file", metavar="FILE", default=None,
                   help="read measurements instead of measuring: a published .csv table (column mapping in --map) "
                        "or a runner/VramplanCallback .jsonl log; writes validated measurement records")
    p.add_argument("--map", dest="import_map", metavar="TOML", default=None,
                   help="with --import of a .csv: the sources file mapping its columns and sources "
                        "(default: measurements/sources.toml when present)")
    p.add_argument("--import-out", metavar="PATH", default=None,
                   help="with --import: where the records go (default <out>/imported/<file stem>.jsonl)")
    p.add_argument("--split-by-card", action="store_true",
                   help="with --import of a log that mixes cards: one <card>.jsonl per card under --import-out")


def print_record(rec: dict) -> None:
    """One plain line per record on stderr (the progress of a run without a terminal)."""
    mib = 1 << 20
    if rec.get("kind") == "search":
        print(f"search {rec['model']} {rec['method']} {rec['vary']}: largest fit {rec.get('largest_fit')}, "
              f"first OOM {rec.get('smallest_oom')} ({rec.get('probes')} probes, {rec.get('reason')})", file=sys.stderr)
        return
    c, m = rec.get("config") or {}, rec.get("memory") or {}
    what = f"{rec.get('model')} {rec.get('method')} b{c.get('batch')} s{c.get('seq')}{' gc' if c.get('grad_ckpt') else ''} {c.get('optimizer')}"
    if rec.get("status") == "ok":
        mem = ""
        if m.get("max_allocated") is not None:
            mem = (f" alloc {m['max_allocated'] / mib:,.0f} MiB reserved {m['max_reserved'] / mib:,.0f} MiB"
                   + (f" nvml {m['nvml_process_bytes'] / mib:,.0f} MiB" if m.get("nvml_process_bytes") else ""))
        print(f"ok   {what}: {rec.get('step_s_median', 0):.4f} s/step {rec.get('tokens_per_s') or 0:,.0f} tok/s{mem} "
              f"(load {rec.get('load_s', 0):.1f} s, point {rec.get('elapsed_s', 0):.1f} s)", file=sys.stderr)
    else:
        print(f"{rec.get('status'):4s} {what}: {rec.get('error')}", file=sys.stderr)


def run_from_args(args: argparse.Namespace) -> dict:
    from .fit import fit_profile
    from .report import write_report
    from .runner import run_calibration

    if getattr(args, "import_file", None):
        return run_import(args)
    report_dir = None if args.no_report else args.report_dir
    if args.fit_only:
        log = Path(args.fit_only)
        if not log.is_file():
            raise VramplanError(f"no calibration log {log}", "pass the <gpu>.jsonl that `vramplan calibrate` wrote")
        from ..measurements.record import require_fit_points
        from .log import read_log

        records = read_log(log)
        require_fit_points(records, log)  # never an empty profile over the card's real one
        try:
            prof = fit_profile(log, records)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # a record of the wrong shape
            raise VramplanError(f"calibration log {log} holds a malformed record ({type(exc).__name__}: "
                                f"{str(exc)[:80]})", "is it a log written by `vramplan calibrate`?") from None
        target = log.with_suffix(".json")
        if target.resolve() == log.resolve():  # never write over the input log
            target = log.with_name(f"{log.stem}.profile.json")
        path = prof.save(target)
        rep = write_report(log, prof, report_dir) if report_dir else (None, None)
        out = {"gpu": prof.gpu, "log": str(log), "profile": str(path),
               "report": str(rep[0]) if rep[0] else None, "plot": str(rep[1]) if rep[1] else None,
               "holdout": {k: r.to_json() for k, r in prof.holdout.items()}}
        print(closing_line(out), file=sys.stderr)
        return out
    bar = not args.no_progress and sys.stderr.isatty()
    res = run_calibration(gpu=args.gpu, suite=args.suite, out=args.out, resume=args.resume, quick=args.quick,
                          device=args.device, report_dir=report_dir, progress=bar,
                          dryrun=args.dryrun, time_limit_s=args.time_limit,
                          on_record=None if bar else print_record,
                          retry_failed=getattr(args, "retry_failed", False))
    out = res.to_json()
    if res.profile is not None:
        out["holdout"] = {k: r.to_json() for k, r in res.profile.holdout.items()}
        out["holdout_by_method"] = {m: {k: r.to_json() for k, r in d.items()}
                                    for m, d in res.profile.holdout_by_method.items()}
    if res.crashed_skipped:
        print(f"vramplan calibrate: skipped {len(res.crashed_skipped)} point(s) that crashed before "
              "(--retry-failed measures them again)", file=sys.stderr)
    print(closing_line(out), file=sys.stderr)
    return out


def closing_line(out: dict) -> str:
    """The last line of a calibration: where the profile, the raw log and the report are."""
    parts = [f"profile {out.get('profile') or '(not written: nothing measured)'}", f"log {out.get('log')}"]
    parts.append(f"report {out['report']}" + (f" + {out['plot']}" if out.get("plot") else "") if out.get("report")
                 else "report (none)")
    state = "" if out.get("complete", True) else f"; {out.get('remaining')} left: run again with --resume"
    return "vramplan calibrate: wrote " + ", ".join(parts) + state


def print_import(out: dict) -> None:
    print(f"imported {out['records']} records ({out['usable_for_fit']} usable to calibrate, "
          f"{out['estimated']} estimates): " + ", ".join(f"{k} {v}" for k, v in out["outcomes"].items()))
    for p in out["written"]:
        print(f"written: {p}")


def run_import(args: argparse.Namespace) -> dict:
    """``--import FILE``: records from a table or a log, validated, written as JSONL; a summary dict."""
    from ..measurements.importers import import_file, one_card, summary, write_import

    src = Path(args.import_file)
    mapping = args.import_map
    if mapping is None and src.suffix.lower() == ".csv" and Path("measurements/sources.toml").exists():
        mapping = "measurements/sources.toml"
    recs = import_file(src, mapping)
    if not recs:
        raise VramplanError(f"{src} holds no measurement to import", "a log needs point records with a status ok or oom")
    is_log = src.suffix.lower() != ".csv"
    if is_log and not args.split_by_card:
        one_card(recs, src)  # a log from one machine is one card's; mixed cards are refused, or split
    out = Path(args.import_out) if args.import_out else Path(args.out) / "imported" / (
        src.stem if not args.split_by_card else src.stem)
    if not args.split_by_card and out.suffix != ".jsonl":
        out = out.with_suffix(".jsonl")
    paths = write_import(recs, out, split=args.split_by_card)
    res = summary(recs)
    res["written"] = [str(p) for p in paths]
    return res


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
    elif "written" in out:
        print_import(out)
    else:
        print(f"log:     {out.get('log')}")
        print(f"profile: {out.get('profile')}")
        if out.get("report"):
            print(f"report:  {out['report']}" + (f" (plot {out['plot']})" if out.get("plot") else ""))
        for k, r in (out.get("holdout") or {}).items():
            if r.get("n"):
                print(f"held out {k}: n={r['n']} median |err| {100 * (r['median_abs_rel'] or 0):.1f}%, "
                      f"worst under {100 * (r['max_under_rel'] or 0):.1f}%")
        for m, d in (out.get("holdout_by_method") or {}).items():
            r = d.get("reserved") or d.get("tokens_per_s") or {}
            what = "reserved" if d.get("reserved") else "tokens/s"
            if r.get("n") == 1:
                print(f"  {m}: {what} 1 point, error {100 * (r.get('median_rel') or 0):+.1f}%")
            elif r.get("n"):
                print(f"  {m}: {what} n={r['n']} median |err| {100 * (r['median_abs_rel'] or 0):.1f}%")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
