"""``vramplan`` command line: parse, call one library function, render. No logic here."""

from __future__ import annotations

import argparse
import gc
import json
import sys

from .errors import VramplanError
from .validate import arg_int, arg_real, arg_size, arg_text


def _add_plan_args(p: argparse.ArgumentParser, *, single: bool = True, model_required: bool = True) -> None:
    p.add_argument("--model", required=model_required, type=arg_text("model"), help="catalogue name, size alias (13b), HF repo id, or a config.json path/dir")
    if single:
        from .methods import method_names, takes_adapter_choice
        from .optimizers import DEFAULT_OPTIMIZER, OPTIMIZERS

        names = method_names()
        p.add_argument("--method", default="lora", help=f"{'|'.join(names)} (default lora)")
        p.add_argument("--adapter", default=None, help=f"for {'/'.join(n for n in names if takes_adapter_choice(n))}: "
                       "full|lora|qlora|dora|ia3")
        p.add_argument("--batch", type=arg_int("batch"), default=1, help="micro-batch size (default 1)")
    p.add_argument("--gpu", default=None, help="catalogue GPU name, or 'auto' (NVML)")
    p.add_argument("--gpu-mem", type=arg_size("gpu-mem"), default=None,
                   help="plan for any capacity: 24 (a bare number is GB as cards are sold: 24 GiB), 24GiB, 80GB")
    p.add_argument("--seq", type=arg_int("seq", suffixes=True), default=2048,
                   help="tokens per sequence: 2048, 4k, 32k (k = 1024; default 2048)")
    if single:
        p.add_argument("--rank", type=arg_int("rank"), default=8, help="LoRA/DoRA rank (default 8)")
    else:
        p.add_argument("--rank", type=arg_int("rank"), default=None, help="LoRA/DoRA rank (default: search 8, 16, 64)")
    p.add_argument("--targets", default=None, help="q_proj,v_proj | all-linear (default: PEFT's for the model"
                   + ("" if single else "; fit also tries all-linear") + ")")
    p.add_argument("--precision", default=None, help="bf16|bf16-mixed|fp16-mixed|fp32 (default: the stack's; "
                   "bf16-mixed for hf, bf16 for torchtune/litgpt)")
    from .request import ATTENTION, DEFAULT_ATTENTION

    if single:
        p.add_argument("--attn", default=DEFAULT_ATTENTION, help=f"{'|'.join(ATTENTION)} (default {DEFAULT_ATTENTION})")
    else:
        p.add_argument("--attn", default=None, help=f"{'|'.join(ATTENTION)} (default: search those the card runs, "
                       "eager only when asked for)")
    if single:
        p.add_argument("--alpha", type=arg_real("alpha", lo=-1e6), default=None, help="LoRA alpha (default = rank)")
        p.add_argument("--dropout", type=arg_real("dropout", lo=0.0, hi=1.0, hi_open=True), default=0.0,
                       help="LoRA dropout, 0 <= p < 1 (default 0)")
        p.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None, help="gradient checkpointing on")
        p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="gradient checkpointing off")
        p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, help="|".join(OPTIMIZERS))
        p.add_argument("--grad-accum", type=arg_int("grad-accum"), default=1, help="gradient accumulation steps")
        p.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=True,
                       help="QLoRA without double quantisation")
        _add_method_option_args(p)
    _add_stack_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_method_option_args(p: argparse.ArgumentParser) -> None:
    """Each registered method's own options (vramplan.methods.base.Option) as a flag: ``--ppo-response``, ..."""
    from .methods import all_options

    for o in all_options():
        label = o.cli_flag.lstrip("-")
        if o.kind == "bool":
            p.add_argument(o.cli_flag, dest=o.name, action="store_true", default=None, help=o.help)
            continue
        kind = {"int": arg_int(label, lo=int(o.lo) if o.lo is not None else 1, suffixes=True),
                "float": arg_real(label, **({"lo": o.lo} if o.lo is not None else {}))}.get(o.kind, str)
        p.add_argument(o.cli_flag, dest=o.name, type=kind, default=None, help=o.help)


def _method_options(a: argparse.Namespace) -> dict | None:
    """The method options given on the command line, by option name (None: none given)."""
    from .methods import all_options

    return {o.name: getattr(a, o.name) for o in all_options() if getattr(a, o.name, None) is not None} or None


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    """``--framework`` and ``--techniques`` (estimate, dryrun, fit, matrix); the library validates both."""
    from .stacks import DEFAULT_STACK, stacks, techniques

    p.add_argument("--framework", default=DEFAULT_STACK,
                   help=f"training stack: {'|'.join(stacks())} (default {DEFAULT_STACK})")
    p.add_argument("--techniques", default=None,
                   help=f"memory-saving techniques on every plan: {','.join(techniques())}")


def _add_scale_args(p: argparse.ArgumentParser, *, fit: bool = False) -> None:
    """GPUs, sharding strategy, global batch and dataset size (estimate and fit)."""
    g = p.add_argument_group("scale and time (vramplan.distributed, vramplan.throughput)")
    g.add_argument("--gpus", type=arg_int("gpus"), default=1, help="number of GPUs (default 1)")
    g.add_argument("--strategy", default=None,
                   help="ddp|zero1|zero2|zero3|fsdp (default: ddp with --gpus > 1" + ("; fit searches all" if fit else "")
                   + ")")
    g.add_argument("--offload", default=None, help="cpu|none: optimiser (zero1/2) or parameters too (zero3/fsdp) in host memory")
    g.add_argument("--global-batch", type=arg_int("global-batch"), default=None, help="examples per optimiser step over all GPUs "
                   "(sets gradient accumulation)")
    g.add_argument("--tokens", default=None, help="dataset tokens per epoch (500M, 2B) for time to train and GPU-hours")
    g.add_argument("--epochs", type=arg_real("epochs", lo=0.0, lo_open=True), default=1.0,
                   help="epochs over --tokens (default 1)")
    if fit:
        g.add_argument("--batch", type=arg_int("batch"), default=None, help="fix the micro-batch (default: search)")
        g.add_argument("--optimizer", default=None, help="fix the optimiser (default: AdamW, then 8-bit/paged)")
        g.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None, help="fix gradient checkpointing on")
        g.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="fix gradient checkpointing off")
        g.add_argument("--margin", type=arg_real("margin", lo=0.0, hi=1.0, hi_open=True), default=None,
                       help="fraction of memory kept free, 0 <= m < 1 (default 0.15)")
        g.add_argument("--top", type=arg_int("top", lo=0), default=0, help="also print each method's N best plans and why they lose")


def _scale_kwargs(a: argparse.Namespace) -> dict:
    return dict(gpus=a.gpus, strategy=a.strategy, offload=a.offload, global_batch=a.global_batch, tokens=a.tokens,
                epochs=a.epochs)


def _default_stack() -> str:
    from .stacks import DEFAULT_STACK

    return DEFAULT_STACK


def _plan_kwargs(a: argparse.Namespace) -> dict:
    """The library keyword arguments of estimate/dryrun (no Namespace reaches library code)."""
    return dict(adapter=a.adapter, gpu=a.gpu, gpu_mem=a.gpu_mem, batch=a.batch, seq=a.seq, grad_accum=a.grad_accum,
                rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets, grad_ckpt=a.grad_ckpt,
                optimizer=a.optimizer, precision=a.precision, attn=a.attn, double_quant=a.double_quant,
                method_options=_method_options(a), framework=getattr(a, "framework", None) or _default_stack())


def _methods_list(a: argparse.Namespace) -> list[str] | None:
    text = getattr(a, "methods", None)
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def request_from_args(a: argparse.Namespace):
    """The typed request of a parsed command line (vramplan.request): the one place CLI flags become library
    input, the same objects the Python API builds from keywords.

    ``estimate``/``dryrun`` -> :class:`~vramplan.request.EstimateRequest`; ``fit``/``cards`` ->
    :class:`~vramplan.request.FitRequest`; ``matrix`` -> :class:`~vramplan.request.MatrixRequest`.
    """
    from .request import EstimateRequest, FitRequest, MatrixRequest

    if a.command in ("fit", "cards"):
        return FitRequest.build(
            model=a.model, gpu=a.gpu, gpu_mem=a.gpu_mem, seq=a.seq, precision=a.precision, attn=a.attn, rank=a.rank,
            targets=a.targets, batch=a.batch, optimizer=a.optimizer, grad_ckpt=a.grad_ckpt, margin=a.margin,
            top=max(20, a.top), framework=a.framework, techniques=a.techniques, method_options=_method_options(a),
            methods=_methods_list(a), **_scale_kwargs(a))
    if a.command == "matrix":
        return MatrixRequest.build(models=a.models, methods=a.methods, gpus=a.gpus, seqs=a.seq, batch=a.batch,
                                   precision=a.precision, attn=a.attn, rank=a.rank, targets=a.targets,
                                   framework=a.framework, techniques=a.techniques, method_options=_method_options(a))
    scale = _scale_kwargs(a) if a.command == "estimate" else {}
    return EstimateRequest.build(model=a.model, method=a.method, **_plan_kwargs(a), **scale, techniques=a.techniques,
                                 versions=getattr(a, "stack_version", None))


def _print_json(obj) -> None:
    """One JSON object on stdout; ``allow_nan=False``, so a NaN or infinity can never escape as invalid JSON."""
    from .results import json_text, jsonable

    try:
        text = json_text(jsonable(obj))
    except ValueError:
        raise VramplanError("the result holds a non-finite number (NaN or infinity), so it is not printed as JSON",
                            "this is a bug in vramplan; please report the command") from None
    print(text)


def _stem(text: str) -> str:
    from .validate import typed_arg, file_stem

    return typed_arg(lambda t: file_stem(t, "--name"), "name")(text)


def _console():
    """The console the tables print on. Where it emits no colour (output piped or redirected: rich's
    ``color_system`` is None), rich's automatic highlighting of numbers and names in printed strings
    would only compute styles that are then dropped, so it is off (the same bytes, without its regex
    passes: about a third of a ``fit`` table's render time); on a colour terminal it stays on.

    Emoji codes are off everywhere: vramplan's text never means one, so a name or path holding
    ``:word:`` prints as written instead of becoming a pictogram, and rich neither loads its table of
    codes nor scans each printed string for them (about 1% of a ``fit`` table's command)."""
    from rich.console import Console

    console = Console(emoji=False)
    if console.color_system is None:
        console = Console(highlight=False, emoji=False)
    return console


def _estimate_from_file(a):
    """``estimate --config FILE``: the file's settings, with every flag given on the command line winning."""
    from .integrations.config_files import estimate_file

    defaults = vars(build_parser().parse_args(["estimate", f"--config={a.config}"]))
    kw = {**_plan_kwargs(a), **_scale_kwargs(a)}
    overrides = {k: v for k, v in kw.items() if k not in ("gpu", "gpu_mem") and v != defaults.get(k)}
    if a.method != defaults.get("method"):
        overrides["method"] = a.method
    return estimate_file(a.config, gpu=kw.get("gpu"), gpu_mem=kw.get("gpu_mem"), model=a.model, **overrides)


def cmd_estimate(a) -> int:
    from .plan import estimate

    if getattr(a, "config", None):
        est = _estimate_from_file(a)
    elif a.model is None:
        raise VramplanError("estimate needs --model", "or --config FILE (an Axolotl YAML or HF/TRL training arguments)")
    else:
        est = estimate(request_from_args(a))
    if a.json:
        _print_json(est)
    else:
        from .render import render_estimate

        render_estimate(est, _console())
    return 0


def _add_distributed_dryrun_args(p: argparse.ArgumentParser) -> None:
    """``vramplan dryrun --gpus N --strategy S``: the engines traced per rank (vramplan.dryrun.distributed)."""
    g = p.add_argument_group("multi-GPU dry run (N local CPU ranks, gloo; vramplan.dryrun.distributed)")
    g.add_argument("--gpus", type=int, default=1, help="ranks to trace (2-8); 1 = the single-device dry run")
    g.add_argument("--strategy", default=None, help="ddp|zero1|zero2|zero3|fsdp (default ddp with --gpus > 1)")
    g.add_argument("--engine", default=None, help="auto|torch|deepspeed (default auto: DeepSpeed for zero1/2/3 "
                   "when installed, else ZeroRedundancyOptimizer / FSDP2)")
    g.add_argument("--layers", type=int, default=2, help="decoder layers built (default 2; random weights)")
    g.add_argument("--fsdp-reshard-after-forward", dest="reshard_after_forward", action="store_true", default=None,
                   help="FSDP2: free each unit's parameters after its forward (the default; zero2: off)")
    g.add_argument("--no-fsdp-reshard-after-forward", dest="reshard_after_forward", action="store_false",
                   help="FSDP2: keep them gathered until backward (SHARD_GRAD_OP)")
    g.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP bucket_cap_mb (default 25)")
    g.add_argument("--reduce-bucket-size", type=int, default=None, help="DeepSpeed reduce_bucket_size, elements")
    g.add_argument("--allgather-bucket-size", type=int, default=None, help="DeepSpeed allgather_bucket_size, elements")
    g.add_argument("--prefetch-bucket-size", type=int, default=None,
                   help="DeepSpeed stage3_prefetch_bucket_size, elements")
    g.add_argument("--max-live-parameters", type=int, default=None,
                   help="DeepSpeed stage3_max_live_parameters, elements")
    g.add_argument("--offload", default=None, help="cpu|none (cpu cannot be traced on a CPU-only host: planned only)")
    g.add_argument("--no-sync", dest="no_sync", action="store_true", default=None,
                   help="with --grad-accum > 1: skip the gradient sync on all but the last micro-batch (DDP/FSDP "
                        "no_sync; default: the stack's loop)")
    g.add_argument("--sync-each-micro-batch", dest="no_sync", action="store_false",
                   help="with --grad-accum > 1: synchronise every micro-batch (FSDP reduce-scatters each)")


def cmd_dryrun(a) -> int:
    from .dryrun import dryrun
    from .render import Elapsed, render_estimate

    if getattr(a, "gpus", 1) != 1 or getattr(a, "strategy", None):
        from .dryrun.distributed import (ENGINE_OPTION_NAMES, DistributedDryRunRequest, EngineOptions,
                                         distributed_dryrun)

        with Elapsed(f"dryrun: {a.gpus} CPU ranks (gloo), one real {a.strategy or 'ddp'} step per rank"):
            res = distributed_dryrun(DistributedDryRunRequest(
                a.model, a.method, gpus=a.gpus, strategy=a.strategy or "ddp", engine=a.engine, layers=a.layers,
                batch=a.batch, seq=a.seq, rank=a.rank, targets=a.targets, grad_ckpt=a.grad_ckpt,
                precision=a.precision or "bf16", attn=a.attn, offload=a.offload,
                grad_accum=getattr(a, "grad_accum", 1) or 1,
                options=EngineOptions(**{k: getattr(a, k) for k in ENGINE_OPTION_NAMES})))
        _print_json(res.to_json()) if a.json else res.render(_console())
        return 0
    with Elapsed("dryrun: building the model on the meta device and tracing one training step"):
        res = dryrun(request_from_args(a))
    if a.json:
        _print_json(res)
    elif hasattr(res, "render"):
        res.render(_console())
    else:
        render_estimate(res, _console())
    return 0


def cmd_cards(a) -> int:
    """``vramplan cards`` / ``fit --gpu all``: every catalogue card that fits, by time and by cost."""
    from .plan import fit_cards
    from .render import ProgressBar, render_cards

    with ProgressBar("cards") as bar:
        rep = fit_cards(request_from_args(a), progress=bar)
    _print_json(rep) if a.json else render_cards(rep, _console(), verbose=getattr(a, "verbose", False))
    return 0


def cmd_fit(a) -> int:
    from .plan import fit

    if str(a.gpu or "").lower() == "all":
        return cmd_cards(a)

    rep = fit(request_from_args(a))
    if a.json:  # rich and the renderers load only for a table
        _print_json(rep)
    else:
        from .render import render_fit

        render_fit(rep, _console(), top=a.top, verbose=getattr(a, "verbose", False))
    return 0


def cmd_matrix(a) -> int:
    from .matrix import feasibility_matrix, parse_formats, write_csv, write_markdown, write_reports

    from .render import ProgressBar

    if a.format:
        parse_formats(a.format)  # a bad --format, preamble or --out is refused before the work, not after it
    preamble = None
    if a.out and not a.json:
        from .validate import read_text, write_error
        from pathlib import Path

        if a.preamble:
            preamble = read_text(a.preamble, "preamble", max_bytes=1 << 20)  # a regular text file, at most 1 MiB
        try:
            Path(a.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, a.out, "directory") from None
    with ProgressBar("matrix") as bar:
        mx = feasibility_matrix(request_from_args(a), progress=bar)
    if a.json:
        _print_json(mx)
    elif a.out:
        with ProgressBar("figures") as bar:
            paths = write_reports(mx, a.out, a.format or "md,csv,html,png", a.name, preamble=preamble, progress=bar)
        for path in paths:
            print(path)
    else:
        fmt = parse_formats(a.format or "md")
        if fmt not in (["md"], ["csv"]):
            raise VramplanError(f"--format {','.join(fmt)} needs --out DIR", "or print one of md, csv to stdout")
        (write_markdown if fmt == ["md"] else write_csv)(mx, sys.stdout)
    return 0


def cmd_models(a) -> int:
    from .models import catalogue
    from .render import render_models

    ms = list(catalogue().values())
    if a.json:
        _print_json([{"name": m.name, "hf_id": m.hf_id, "params": m.params, "aliases": list(m.aliases),
                      "source": m.source} for m in ms])
    else:
        render_models(ms, _console())
    return 0


def cmd_gpus(a) -> int:
    from .gpus import catalogue
    from .render import render_gpus

    gs = list(catalogue().values())
    if a.json:
        _print_json([{"name": g.name, "display_name": g.display_name, "memory_bytes": g.memory_bytes,
                      "bf16_tflops": g.bf16_tflops, "bandwidth_gbs": g.bandwidth_gbs, "aliases": list(g.aliases),
                      "sources": g.sources} for g in gs])
    else:
        render_gpus(gs, _console())
    return 0


def cmd_calibrate(a) -> int:
    from .calibration.__main__ import run_from_args

    out = run_from_args(a)
    if getattr(a, "json", False):
        _print_json(out)
    elif getattr(a, "import_file", None):
        from .calibration.__main__ import print_import

        print_import(out)
    return 0


def cmd_methods(a) -> int:
    from .methods import registry

    for m in registry().values():
        print(f"{m.name:6} {m.summary}  [adapters: {', '.join(x.value for x in m.adapters)}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (every subcommand with its arguments)."""
    return _parser_for(None)


#: The subcommands, in --help's order.
COMMANDS = ("estimate", "dryrun", "fit", "cards", "models", "gpus", "matrix", "calibrate", "methods")

#: The subcommands that only plan (numpy, the catalogues; never torch). They run with the cyclic
#: garbage collector paused (restored afterwards): its passes over the planner's modules and
#: objects cost ~1.7% of a ``fit``'s instructions, and the few reference cycles a plan leaves are
#: freed with the process (peak RSS of ``fit`` and of ``cards`` over every card measured the same
#: with and without it). ``dryrun`` and ``calibrate`` build real models and keep the collector. (The
#: program itself, vramplan.__main__, pauses it for the rest of the process: nothing follows the command.)
PLANNING_COMMANDS = frozenset({"estimate", "fit", "cards", "models", "gpus", "matrix", "methods"})


def command_of(argv: list[str] | None) -> str | None:
    """The subcommand ``argv`` names (its first word not starting with ``-``), if it is one of :data:`COMMANDS`."""
    words = [w for w in (sys.argv[1:] if argv is None else argv) if not str(w).startswith("-")]
    return words[0] if words and words[0] in COMMANDS else None


def _parser_for(only: str | None) -> argparse.ArgumentParser:
    """The command line with every subcommand listed and only ``only``'s arguments added (None: all of them):
    what one invocation parses, without building (and importing for) the other subcommands' arguments.

    While it is built, argparse's messages (gettext's lookup in the ``argparse`` domain: the same three for each
    of the ten parsers) are looked up once each: gettext looks for translation files anew on every call, and
    nothing changes the locale in between. Messages of parsing, usage and help are looked up as argparse does."""
    real = argparse._
    kept: dict[str, str] = {}

    def once(message: str) -> str:
        try:
            return kept[message]
        except KeyError:
            kept[message] = out = real(message)
            return out

    argparse._ = once
    try:
        return _build_parser(only)
    finally:
        argparse._ = real


def _build_parser(only: str | None) -> argparse.ArgumentParser:
    """:func:`_parser_for`'s parser."""
    def want(name: str) -> bool:
        return only is None or only == name

    p = _Parser(prog="vramplan", description="Will it fit, how fast, which configuration: "
                "GPU memory planning for LLM fine-tuning.")
    p.add_argument("--version", action=_VersionAction, nargs=0, help="show program's version number and exit")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("estimate", help="peak memory of one configuration (analytic model)")
    if want("estimate"):
        _estimate_args(e)
    d = sub.add_parser("dryrun", help="exact tensor accounting of one real training step on the meta device")
    if want("dryrun"):
        _add_plan_args(d)
        _add_distributed_dryrun_args(d)
        d.set_defaults(func=cmd_dryrun)
    f = sub.add_parser("fit", help="every method on one GPU (or N): the fastest settings that fit, tokens/s, "
                       "largest batch, longest sequence, what would fit otherwise")
    if want("fit"):
        _fit_args(f)
    k = sub.add_parser("cards", help="which card? every catalogue card on which a method fits, fastest first, "
                       "and by cost (vramplan/data/prices.json); the same as fit --gpu all")
    if want("cards"):
        _add_plan_args(k, single=False)
        _add_method_option_args(k)
        _add_scale_args(k, fit=True)
        k.add_argument("--methods", default=None, help="comma list of methods (default: every method)")
        k.add_argument("--verbose", action="store_true", help="also the assumptions")
        k.set_defaults(func=cmd_cards)
    for name, fn, text in (("models", cmd_models, "list the model catalogue"), ("gpus", cmd_gpus, "list the GPU catalogue")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=fn)
    if want("matrix"):
        _matrix_parser(sub)
    else:
        sub.add_parser("matrix", help=_MATRIX_HELP)
    c = sub.add_parser("calibrate", help="run real steps on a GPU and fit profiles/<gpu>.json (needs the calibrate extra)")
    if want("calibrate"):
        from .calibration.__main__ import add_arguments as _cal_args

        _cal_args(c)
        c.set_defaults(func=cmd_calibrate)
    m = sub.add_parser("methods", help="list the training methods")
    m.set_defaults(func=cmd_methods)
    return p


def _estimate_args(e: argparse.ArgumentParser) -> None:
    _add_plan_args(e, model_required=False)
    _add_scale_args(e)
    e.add_argument("--stack-version", default=None, metavar="PKG=VER,...",
                   help="package versions the run uses where memory behaviour changed between versions "
                        "(e.g. bitsandbytes=0.42.0); default: the installed version, else the latest")
    e.add_argument("--config", default=None, metavar="FILE",
                   help="an Axolotl YAML or HF/TRL training-arguments JSON/YAML; flags set to other than their "
                        "defaults win over the file")
    e.set_defaults(func=cmd_estimate)


def _fit_args(f: argparse.ArgumentParser) -> None:
    _add_plan_args(f, single=False)
    _add_method_option_args(f)
    _add_scale_args(f, fit=True)
    f.add_argument("--methods", default=None, help="comma list of methods (default: every method)")
    f.add_argument("--verbose", action="store_true", help="also the assumptions and the techniques that would "
                   "save memory on plans that already fit")
    f.set_defaults(func=cmd_fit)


_MATRIX_HELP = "feasibility of models x methods x GPUs: verdict, peak, largest micro-batch"


def _matrix_parser(sub) -> None:
    from .verdict import THRESHOLDS_TEXT

    x = sub.add_parser("matrix", help=_MATRIX_HELP,
                       description="One cell per model x method x GPU (x sequence length). Verdicts: "
                       + THRESHOLDS_TEXT + ".")
    x.add_argument("--models", default="all", help="all | comma list of names, aliases (1b,7b), HF ids (default all)")
    x.add_argument("--methods", default="all", help="all | comma list, method+adapter for dpo/ppo (dpo+qlora)")
    x.add_argument("--gpus", default="all", help="all | comma list of GPU names or capacities (rtx3080,24GiB)")
    x.add_argument("--seq", default="2048", help="tokens per sequence, one or a comma list: 2048 or 1k,4k,32k (default 2048)")
    x.add_argument("--batch", type=arg_int("batch", hi=1024), default=1, help="micro-batch of the verdict and peak (default 1)")
    x.add_argument("--rank", type=arg_int("rank"), default=8, help="LoRA/DoRA rank (default 8)")
    x.add_argument("--targets", default=None, help="q_proj,v_proj | all-linear (default: PEFT's for the model)")
    x.add_argument("--precision", default=None, help="bf16|bf16-mixed|fp16-mixed|fp32 (default: the stack's; "
                   "bf16-mixed for hf, bf16 for torchtune/litgpt)")
    from .request import ATTENTION, DEFAULT_ATTENTION

    x.add_argument("--attn", default=DEFAULT_ATTENTION, help=f"{'|'.join(ATTENTION)} (default {DEFAULT_ATTENTION})")
    _add_stack_args(x)
    _add_method_option_args(x)
    x.add_argument("--format", default=None, help="md,csv,html,png (default: md to stdout; all four with --out)")
    x.add_argument("--out", default=None, metavar="DIR", help="write <DIR>/<name>.<format> files")
    x.add_argument("--name", default="feasibility", type=_stem, help="file name stem with --out (default feasibility)")
    x.add_argument("--preamble", default=None, metavar="FILE", help="markdown inserted at the top of the .md file")
    x.add_argument("--json", action="store_true", help="print one JSON object (every cell)")
    x.set_defaults(func=cmd_matrix)


def terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``, without importing :mod:`shutil`.

    The same rule: ``COLUMNS`` when it is a positive integer (``LINES`` aside), else the width of
    the terminal on ``sys.__stdout__``, else 80. argparse asks for the width each time it makes a
    help formatter -- once per argument added, to check its metavar -- and imports shutil to do
    so, which imports bz2 and lzma: ~3-5 ms of a ``fit`` for a number only ``--help`` and errors use.
    """
    import os

    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        size = os.get_terminal_size(sys.__stdout__.fileno())
    except (AttributeError, ValueError, OSError):
        return 80
    return size.columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized by :func:`terminal_columns` (as argparse sizes it, minus 2)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        super().__init__(prog, indent_increment, max_help_position, terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vramplan estimate: error: <what>; see `vramplan estimate --help```
    and exit 2, instead of a usage block. Subcommand parsers inherit this class, and its help
    formatter (:class:`_Formatter`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D401 - argparse API
        import re

        text = " ".join(str(message).split())
        text = re.sub(r"^argument ([-\w/]+): \1 ", r"\1 ", text)  # "argument --seq: --seq must..." said once
        hint = f"see `{self.prog} --help`"
        if "invalid choice" in text and "argument command" in text:
            hint = "see `vramplan --help`"
        self.exit(2, f"{self.prog}: error: {text}; {hint}\n")


class _VersionAction(argparse.Action):
    """``--version``: the installed version, looked up only when asked (its metadata lookup costs a start-up)."""

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(f"{parser.prog} {_version()}\n")
        parser.exit()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vramplan")
    except Exception:  # not installed (a source checkout on PYTHONPATH)
        from . import __version__

        return __version__


def _warn_line(message, category, filename, lineno, file=None, line=None):
    """Library warnings (a sequence beyond the model's context...) as one line on stderr."""
    print(f"vramplan: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    parser = _parser_for(command_of(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line error (or --help / --version)
        return 2 if exc.code not in (0, None) else 0
    old_show = warnings.showwarning
    warnings.showwarning = _warn_line
    collecting = gc.isenabled()
    if args.command in PLANNING_COMMANDS:
        gc.disable()
    try:
        return int(args.func(args) or 0)
    except VramplanError as exc:
        print(f"vramplan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vramplan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        warnings.showwarning = old_show
        if collecting:
            gc.enable()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
