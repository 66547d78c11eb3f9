"""Rendering results as rich tables. Output functions take a ``Console`` so tests capture them."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from .attention import attention_kernel
from .optimizers import get_optimizer
from .stacks import DEFAULT_STACK
from .results import Estimate
from .taxonomy import Component
from .units import fmt_bytes, fmt_count
from .verdict import LIKELY_OVER, label



def _keeps_anothers_states(optimizer: str) -> bool:
    """An optimizer that keeps another's states exactly (``OptimizerDef.same_states_as``: paged 8-bit AdamW, whose
    states are paged only under memory pressure): ``fit --top`` lists the simpler one."""
    return get_optimizer(optimizer).same_states_as is not None

def render_estimate(est: Estimate, console: Console) -> None:
    cfg = est.config
    title = f"{est.model} · {est.method}" + (f" ({est.adapter})" if est.adapter != est.method else "")
    if est.model_resolved_from:
        console.print(f"[dim]model {est.model_resolved_from}[/dim]")
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("component")
    t.add_column("bytes", justify="right")
    t.add_column("GiB", justify="right")
    for c in Component:
        v = est.components.get(c, 0)
        if v:
            t.add_row(c.value, f"{v:,}", f"{v / 2**30:.3f}")
    t.add_row("[bold]tensor peak[/bold]", f"{est.tensor_peak_bytes:,}", f"{est.tensor_peak_bytes / 2**30:.3f}")
    t.add_row("[bold]peak (device total)[/bold]", f"{est.peak_bytes:,}", f"{est.peak_gib:.3f}")
    console.print(t)
    console.print(f"params {fmt_count(est.params)} · trainable {fmt_count(est.trainable_params)} "
                  f"({est.trainable_params:,}) · batch {cfg.batch} × seq {cfg.seq} · peak in {est.peak_phase.value} "
                  f"· ±{fmt_bytes(est.uncertainty_bytes)}")
    if est.gpu is not None:
        v = getattr(est, "verdict", None)
        word = {"comfortable": "[green]fits (comfortable)[/green]", "tight": "[yellow]tight: may fit[/yellow]",
                "no": "[red]does not fit[/red]"}
        if v is not None and label(v, est.peak_bytes, est.capacity_bytes) == LIKELY_OVER:
            word["tight"] = f"[yellow]{LIKELY_OVER} (tight)[/yellow]"  # central prediction over the card
        verdict = (word[v.value] if v is not None
                   else "[green]fits[/green]" if est.fits else "[red]does not fit[/red]")
        console.print(f"{est.gpu}: {verdict} — {fmt_bytes(est.peak_bytes)} of {fmt_bytes(est.capacity_bytes)} "
                      f"(headroom {fmt_bytes(est.headroom_bytes)})"
                      + (f" per GPU, {est.gpus}x {est.strategy}" + (" + CPU offload" if est.offload == "cpu" else "")
                         if getattr(est, "strategy", None) else ""))
        band = (getattr(est, "extra", None) or {}).get("band")
        if v is not None and v.value == "tight" and band:
            from .verdict import advice

            alone = "the training step alone: " if est.constraints else ""  # e.g. GRPO's vLLM share
            console.print(f"· {alone}{advice(est.peak_bytes, est.capacity_bytes, band['hi'], band['lo'])}")
        for c in est.constraints:
            if not c.met:
                console.print(f"· {'[red]' if c.hard else '[yellow]'}{c.text}{'[/red]' if c.hard else '[/yellow]'}")
    if getattr(est, "tokens_per_s", None) is not None:
        t = est.throughput
        line = (f"speed: {est.tokens_per_s:,.0f} tokens/s, {est.step_time_s:.3f} s per optimiser step "
                f"(grad accum {cfg.grad_accum}), {t.achieved_tflops:.0f} TFLOP/s per GPU ({t.mfu:.0%} of peak)")
        if t.comm_s or t.host_s:
            line += f"; communication {t.comm_s:.3f} s, host/offload {t.host_s:.3f} s per step"
        console.print(line)
        if est.time_to_train_s is not None:
            console.print(f"time to train: {fmt_duration(est.time_to_train_s)} ({est.gpu_hours:,.1f} GPU-hours)")
    for a in est.assumptions:
        console.print(f"[dim]· {a}[/dim]")


def fmt_duration(seconds: float | None) -> str:
    """``42 s``, ``17 min``, ``3.4 h``, ``2.1 d`` (rendering only)."""
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _row_label(r) -> str:
    """``lora``, ``lora → qlora`` (a fallback), ``dpo → dpo+qlora``: never a QLoRA plan called lora."""
    label = getattr(r, "label", None)
    return label if label else r.method + (f" ({r.adapter})" if r.adapter != r.method else "")


def plan_brief(plan) -> str:
    """Compact settings of a :class:`vramplan.recommend.Plan`: ``b4x2, GC, adamw, r8`` (GC only when on)."""
    c = plan.config
    parts = [f"b{c.batch}" + (f"x{c.grad_accum}" if c.grad_accum > 1 else "")]
    if c.grad_ckpt:
        parts.append("GC")
    parts.append(get_optimizer(c.optimizer).label)
    if not attention_kernel(c.attn).default:
        parts.append(c.attn)
    if c.recipe.adapter.low_rank:
        parts.append(f"r{c.rank}" + (" all-linear" if len(c.targets) > 2 else ""))
    if plan.parallel.distributed:
        parts.append(plan.parallel.label)
    return ", ".join(parts)


def render_method_limits(report, console: Console) -> None:
    """A method's own limits on the card (``FitRow.limits``: GRPO's largest G x completion), as its lines."""
    for r in report.rows:
        lim = getattr(r, "limits", None)
        if lim is not None:
            for line in lim.lines():
                console.print(line, markup=False, highlight=False)


def _tight_limits_note(report) -> str | None:
    """The footnote of ``max b/seq``: the column is the comfortable limit; where more may fit (tight), up to what."""
    tight = [f"{_row_label(r)} {getattr(r, 'max_batch_tight', 0) or '-'} / {getattr(r, 'max_seq_tight', 0):,}"
             for r in report.rows if (getattr(r, "max_batch_tight", 0), getattr(r, "max_seq_tight", 0))
             > (r.max_batch, r.max_seq)]
    if not tight:
        return None
    return ("max b/seq: comfortable (the margin and the band's upper end under the card); tight (may fit) up to "
            + "; ".join(tight))


def render_fit(report, console: Console, top: int = 0, verbose: bool = False) -> None:
    """One row per method (its best plan); with ``top``, each method's ``top`` ranked plans and why they lose.

    Compact by default: the table, one line per method that needs one (a fallback, what would
    fit), the techniques or stacks that turn a "no" into a fit. ``verbose`` adds the
    techniques that would merely save memory on plans that already fit, and the assumptions.
    """
    if report.model_resolved_from:
        console.print(f"[dim]model {report.model_resolved_from}[/dim]")
    t, footnotes = _fit_table(report)
    console.print(t)
    for f in ([_tight_limits_note(report)] if _tight_limits_note(report) else []) + footnotes:
        console.print(f"· {f}")
    render_method_limits(report, console)
    render_technique_advice(report, console, verbose=verbose)
    render_alternatives(report, console)
    if top:
        _render_ranked_plans(report, console, top)
    if verbose:
        for a in report.assumptions:
            console.print(f"[dim]· {a}[/dim]")
    else:
        console.print("[dim]assumptions (stack, precision, overheads, ranking): --verbose[/dim]")


def _fit_title(report) -> str:
    """``llama-2-7b on rtx4090 (23.99 GiB), seq 2048``, with the GPUs, stack and techniques when not the default."""
    gpus = getattr(report, "gpus", 1)
    where = report.gpu if gpus == 1 else f"{gpus}x {report.gpu}" + (f" {report.strategy}" if report.strategy else "")
    each = " each" if gpus > 1 else ""
    stack = getattr(report, "framework", DEFAULT_STACK)
    techs = tuple(getattr(report, "techniques", ()) or ())
    extra = (f", {stack}" if stack != DEFAULT_STACK else "") + (f", {'+'.join(techs)}" if techs else "")
    return f"{report.model} on {where} ({fmt_bytes(report.capacity_bytes)}{each}), seq {report.seq}{extra}"


def _fit_table(report) -> tuple[Table, list[str]]:
    """The fit table (one row per method) and the footnotes of the rows with notes."""
    t = Table(title=_fit_title(report), header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    timed = getattr(report, "tokens", None) is not None
    cols = [("method", "left"), ("fits", "left"), ("peak GiB", "right"), ("max b/seq", "right"),
            ("tok/s", "right"), ("best settings", "left")]
    if timed:
        cols.insert(5, ("time", "right"))
    for col, just in cols:
        t.add_column(col, justify=just, no_wrap=col not in ("method", "best settings"))
    footnotes = []
    for r in report.rows:
        t.add_row(*_fit_row(r, timed))
        if r.notes:
            footnotes.append(f"{_row_label(r)}: " + "; ".join(r.notes))
    return t, footnotes


_VERDICT_COLOUR = {"comfortable": "green", "tight": "yellow", "no": "red"}


def _fit_row(r, timed: bool) -> list[str]:
    """One method's cells: label, verdict, peak, max batch / seq, tok/s, (time,) settings of the plan shown."""
    v = getattr(r, "verdict", None)
    colour = _VERDICT_COLOUR[v.value] if v is not None else None
    verdict = (f"[{colour}]{v.value}[/{colour}]" if v is not None
               else "[green]yes[/green]" if r.fits else "[red]no[/red]")
    chosen = getattr(r, "chosen", None)
    shown = v.fits if v is not None else r.fits  # comfortable or tight ("tight, try it"): the plan is shown
    if v is not None and v.value == "tight" and not r.fits:  # the central prediction over the card
        verdict = f"[yellow]{LIKELY_OVER}[/yellow]"
    if chosen is not None:
        rec = plan_brief(chosen) if shown else "-"
    else:
        s = r.settings
        rec = f"GC {'on' if s['grad_ckpt'] else 'off'}, {s['optimizer']}, {s['attn']}" if shown else "-"
    tps = getattr(r, "tokens_per_s", None)
    row = [_row_label(r), verdict, f"{r.estimate.peak_gib:.2f}",
           f"{r.max_batch or '-'} / {r.max_seq:,}" if r.max_seq else f"{r.max_batch or '-'} / -",
           f"{tps:,.0f}" if tps and shown else "-", rec]
    if timed:
        row.insert(5, fmt_duration(r.time_to_train_s).replace(" ", "") if shown else "-")
    return row


def _ties_a_listed_twin(plan, plans: list) -> bool:
    """Whether ``plan`` runs an attention that only stands in for another (``AttentionKernel.same_as``: flash for
    sdpa) and the plan with that other attention and every other setting equal is among ``plans`` with the same
    figures (peak bytes and tokens/s): then the listing shows that one only. Where they differ (a padded
    batch or a sliding window gives SDPA a mask that flash-attn does not build) both are listed."""
    twin_name = attention_kernel(plan.config.attn).same_as
    if twin_name is None:
        return False
    twin = plan.config.with_(attn=twin_name)
    return any(q.config == twin and q.peak_bytes == plan.peak_bytes and q.tokens_per_s == plan.tokens_per_s
               and q.parallel == plan.parallel for q in plans)


def _render_ranked_plans(report, console: Console, top: int) -> None:
    """Each method's ``top`` ranked plans and why each loses to the first (``fit --top N``)."""
    for r in report.rows:
        # paged 8-bit AdamW ties 8-bit AdamW, and flash ties sdpa where neither builds a mask the other does not
        # (vramplan.attention): list the simpler one only
        all_plans = [p for p in getattr(r, "plans", []) if not _keeps_anothers_states(p.config.optimizer)]
        listed = [p for p in all_plans if not _ties_a_listed_twin(p, all_plans)]
        plans = listed[:top]
        # an adapter with no plan among those (LoRA behind its QLoRA fallback): show its first, to say why
        for ad in dict.fromkeys(p.adapter for p in listed):
            if all(p.adapter != ad for p in plans):
                plans.append(next(p for p in listed if p.adapter == ad))
        if not plans:
            continue
        pt = Table(title=f"{getattr(r, 'requested', r.method)}: {len(plans)} of {len(r.plans)} plans, "
                   "fastest that fits first",
                   header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
        for col, just in (("#", "right"), ("settings", "left"), ("peak GiB", "right"), ("tok/s", "right"),
                          ("why not first", "left")):
            pt.add_column(col, justify=just)
        for p in plans:
            label = (p.adapter + ", " if p.adapter != getattr(r, "requested", r.method) else "") + plan_brief(p)
            pt.add_row(str(p.rank), label, f"{p.peak_bytes / 2**30:.2f}", f"{p.tokens_per_s:,.0f}", p.reason)
        console.print(pt)
    console.print("[dim]· not listed: paged 8-bit AdamW, which ties 8-bit AdamW, and flash attention where it ties "
                  "sdpa (in --json)[/dim]")


def render_alternatives(report, console: Console) -> None:
    """Other stacks or precisions that turn a method's "no" into a fit (``FitRow.alternatives``)."""
    lines = []
    for r in report.rows:
        for alt in getattr(r, "alternatives", None) or []:
            lines.append(f"{_row_label(r)}: {alt.text}")
    if lines:
        console.print("other stacks and precisions (vramplan/data/stacks.toml) that make it fit:")
        for line in lines:
            console.print(f"· {line}")


def _cost_text(cost: float) -> str:
    return "no slowdown" if cost < 0.005 else f"+{cost:.0%} step time"


def _saving_text(s, label: bool = True) -> str:
    """``chunked cross-entropy −5.9 GiB, no slowdown`` for a :class:`vramplan.recommend.TechniqueSaving`."""
    return f"{s.label if label else s.technique} −{s.saving_bytes / 2**30:.1f} GiB, {_cost_text(s.cost)}"


def render_technique_advice(report, console: Console, useful: float = 0.05, verbose: bool = True) -> None:
    """Per method: the memory-saving techniques that make its plan fit, or (when it already fits) the
    ones that would save at least ``useful`` of its peak. Nothing is printed when no row has any."""
    lines = []
    for r in report.rows:
        a = getattr(r, "techniques", None)
        if a is None:
            continue
        name = _row_label(r)
        if a.needed and a.recommended:
            flag = ",".join(tuple(a.config.techniques) + a.techniques)  # with those already asked for
            each = "; ".join(_saving_text(s) for s in a.recommended)
            if a.fits:
                line = (f"{name}: --techniques {flag} makes it {'fit' if a.comfortable else 'fit (tight)'}: "
                        f"{a.peak_with_bytes / 2**30:.2f} GiB ({each})")
                if a.plan is not None:
                    line += (f"; fastest plan with it: {plan_brief(a.plan)} · {a.plan.peak_bytes / 2**30:.2f} GiB · "
                             f"{a.plan.tokens_per_s:,.0f} tok/s")
            elif verbose:
                line = (f"{name}: not enough: --techniques {flag} leaves {a.peak_with_bytes / 2**30:.2f} GiB > "
                        f"{a.capacity_bytes / 2**30:.2f} GiB ({each})")
            else:
                continue
            lines.append(line)
        elif a.needed:
            if verbose:
                lines.append(f"{name}: no technique that is not on saves memory on this plan")
        elif verbose:
            keep = [s for s in a.savings if s.saving_bytes >= useful * a.peak_bytes][:3]
            if keep:
                lines.append(f"{name}: fits; would also save: " + "; ".join(_saving_text(s, False) for s in keep))
    if lines:
        console.print("memory-saving techniques (vramplan/data/stacks.toml), on each method's plan above:")
        for line in lines:
            console.print(f"· {line}")


def _plain_table(console: Console, header: list[str], rows: list[list[str]]) -> None:
    """Space-aligned columns, every cell whole (for pipes: names are what users copy and type)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    console.file.write("\n".join(lines) + "\n")


def _catalogue_table(title: str, header: list[str], rows: list[list[str]], console: Console) -> None:
    """A catalogue listing that never truncates a cell.

    Piped (not a terminal): plain aligned text at whatever width the cells need. In a terminal:
    a rich table whose first column (the name) never wraps and whose other cells fold onto more
    lines rather than end in an ellipsis, at any width (80 columns included).
    """
    if not console.is_terminal:
        _plain_table(console, header, rows)
        return
    # the aliases (last column), one per line, so each stays whole; columns between the first two and the
    # aliases are dropped when the terminal is too narrow for them (--json and a pipe keep every one)
    rows = [r[:-1] + ["\n".join(a.strip() for a in r[-1].split(",") if a.strip()) or "-"] for r in rows]
    widths = [max(len(header[i]), *(max(len(x) for x in r[i].split("\n")) for r in rows)) for i in range(len(header))]
    keep = list(range(len(header)))
    while sum(widths[i] + 3 for i in keep) + 1 > console.width and len(keep) > 2:  # padding + rule per column
        keep.pop(-2)
    if sum(widths[i] + 3 for i in keep) + 1 > console.width:  # too narrow even for name + aliases: one per line
        for r in rows:
            console.print(f"{r[0]}: " + ", ".join(r[-1].split("\n")), overflow="fold")
        return
    t = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for i in keep:
        t.add_column(header[i], no_wrap=True, min_width=widths[i])
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    console.print(t)
    if len(keep) < len(header):
        console.print(f"[dim]{', '.join(header[i] for i in range(len(header)) if i not in keep)}: in a wider "
                      "terminal, piped, or with --json[/dim]")


def render_models(models, console: Console) -> None:
    rows = [[m.name, fmt_count(m.params), str(m.num_layers), str(m.hidden_size), f"{m.num_heads} ({m.num_kv_heads})",
             str(m.vocab_size), ", ".join(dict.fromkeys(([m.hf_id] if m.hf_id else []) + list(m.aliases)))]
            for m in models]
    _catalogue_table("models", ["name", "params", "layers", "hidden", "heads (kv)", "vocab", "also accepted"], rows,
                     console)


def render_gpus(gpus, console: Console) -> None:
    rows = [[g.name, fmt_bytes(g.memory_bytes), f"{g.bf16_tflops:g}", f"{g.bandwidth_gbs:g}", g.compute_capability,
             "yes" if g.bf16 else "no", "yes" if g.flash_attention else "no", ", ".join(g.aliases)] for g in gpus]
    _catalogue_table("GPUs", ["name", "memory", "BF16 TF", "GB/s", "CC", "bf16", "flash", "aliases"], rows, console)


# -- progress of long commands ---------------------------------------------------------------

class ProgressBar:
    """A rich progress bar with elapsed time and ETA on stderr, for commands that take seconds to minutes.

    Use as a context manager; call it as ``bar(done, total, item)`` (the signature of the library's
    ``progress`` callbacks). When stderr is not a terminal nothing is drawn; instead a plain line
    (done/total, elapsed, ETA) is printed once the work has run :data:`FIRST_S` seconds and then at
    most every ``quiet_after / 2`` seconds, so a log shows the command is alive (and a command
    that fails at once keeps its one-line error alone). Output goes to stderr only: stdout stays what ``--json`` or a pipe expects.
    """

    def __init__(self, label: str, total: int | None = None, quiet_after: float = 10.0):
        self.label, self.total, self.quiet_after = label, total, quiet_after
        self._progress = None
        self._task = None
        self._start = None

    def __enter__(self):
        import time

        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._start = self._last_line = time.monotonic()
        self._said = False
        console = Console(stderr=True)
        self._terminal = console.is_terminal
        if self._terminal:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[item]}"), console=console, transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total, item="")
        return self

    def __call__(self, done: int, total: int, item: str = "") -> None:
        import sys
        import time

        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, item=str(item))
            return
        now = time.monotonic()
        elapsed = now - self._start
        if not self._said and elapsed >= FIRST_S and done < total:
            self._said, self._last_line = True, now
            print(f"{self.label}: {done}/{total} ({elapsed:.0f} s)", file=sys.stderr, flush=True)
        elif now - self._last_line >= self.quiet_after / 2 and 0 < done < total:
            self._last_line = now
            eta = elapsed / done * (total - done)
            print(f"{self.label}: {done}/{total} ({elapsed:.0f} s, about {eta:.0f} s left)", file=sys.stderr,
                  flush=True)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


def render_cards(report, console: Console, verbose: bool = False, top: int = 12) -> None:
    """``fit --gpu all``: the cards that fit, fastest first, then the cheapest, with the price sources."""
    from .prices import sources

    timed = report.tokens is not None
    title = (f"{report.model}, seq {report.seq}: cards where {', '.join(report.methods)} fits "
             f"with the margin, fastest first")
    t = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    wide = console.width >= 110 or not console.is_terminal
    cols = ["card", "method", "peak GiB", "tok/s", "time" if timed else "$/Mtok", "cost" if timed else "$/h"]
    if wide:
        cols.append("settings")
    for c in cols:
        t.add_column(c, justify="left" if c in ("card", "method", "settings") else "right", no_wrap=c != "settings")
    for r in report.rows:
        fr = r.row
        h = r.price.cloud_usd_per_hour
        money = (f"${r.cost_usd:,.2f}" if r.cost_usd is not None else "-") if timed else (f"${h:.2f}" if h else "-")
        spd = (fmt_duration(fr.time_to_train_s) if timed else
               (f"${r.cost_per_mtok_usd:.3f}" if r.cost_per_mtok_usd is not None else "-"))
        cells = [r.gpu, fr.label, f"{fr.estimate.peak_gib:.1f}", f"{r.tokens_per_s:,.0f}", spd, money]
        if wide:
            cells.append(plan_brief(fr.chosen) if fr.chosen is not None else "-")
        t.add_row(*cells)
    console.print(t)
    if not report.rows:
        console.print("nothing fits on a single catalogue card with the margin: try `vramplan fit --gpu NAME "
                      "--gpus N`, another --framework or --precision bf16")
    priced = [r for r in report.by_cost if r.cost_per_mtok_usd is not None]
    if priced:
        what = "cost to train" if timed else "cost per million tokens"
        console.print(f"cheapest ({what}, on-demand cloud price): " + "; ".join(
            f"{r.gpu} {r.row.label} " + (f"${r.cost_usd:,.2f}" if timed else f"${r.cost_per_mtok_usd:.3f}/Mtok")
            for r in priced[:3]))
    if report.no_fit:
        console.print(f"[dim]no plan fits with the margin on: {', '.join(report.no_fit)}[/dim]")
    used = sorted({k for r in report.rows for k in (r.price.cloud_source, r.price.list_source) if k})
    for k in used:
        s = sources()[k]
        console.print(f"[dim]· prices: {s['title']}, {s['date']} ({s['url']}): {s['what']}[/dim]")
    if verbose:
        for a in report.assumptions:
            console.print(f"[dim]· {a}[/dim]")
    else:
        console.print("[dim]assumptions: --verbose; settings: a wider terminal or --json[/dim]"
                      if not wide else "[dim]assumptions: --verbose; every card and plan: --json[/dim]")


class Elapsed:
    """A spinner with the elapsed time on stderr while one long call runs (no ETA: one step, unknown length).

    In a terminal: a rich status line, gone when the call returns. Piped: after :data:`FIRST_S`
    seconds one plain line on stderr saying what runs, then one every :data:`HEARTBEAT_S` seconds,
    so a log is never silent for long (a call that fails sooner keeps its one-line error alone).
    stdout is left alone.
    """

    def __init__(self, label: str):
        self.label = label
        self._status = None

    def __enter__(self):
        import sys
        import time

        from rich.console import Console

        console = Console(stderr=True)
        self._start = time.monotonic()
        if console.is_terminal:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._status = Progress(SpinnerColumn(), TextColumn(self.label), TimeElapsedColumn(), console=console,
                                    transient=True)
            self._status.__enter__()
            self._status.add_task(self.label, total=None)
        else:
            import threading

            self._stop = threading.Event()

            def beat():  # after FIRST_S what runs, then a line every HEARTBEAT_S: a log never goes quiet for long
                if self._stop.wait(FIRST_S):
                    return  # done (or failed: its one-line error stays one line) before anything needed saying
                print(f"{self.label} ...", file=sys.stderr, flush=True)
                while not self._stop.wait(HEARTBEAT_S):
                    print(f"... still running ({time.monotonic() - self._start:.0f} s)", file=sys.stderr, flush=True)

            self._beat = threading.Thread(target=beat, daemon=True)
            self._beat.start()
        return self

    def __exit__(self, *exc):
        if self._status is not None:
            self._status.__exit__(*exc)
        elif getattr(self, "_stop", None) is not None:
            self._stop.set()
            self._beat.join()
        return False


#: Seconds between the plain progress lines of a long call when stderr is not a terminal.
HEARTBEAT_S = 8.0
#: Seconds before the first of them (a call that ends sooner prints nothing).
FIRST_S = 2.0
