"""Rendering results as rich tables. Output functions take a ``Console`` so tests capture them."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .results import Estimate
from .taxonomy import Component
from .units import fmt_bytes, fmt_count


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
        verdict = "[green]fits[/green]" if est.fits else "[red]does not fit[/red]"
        console.print(f"{est.gpu}: {verdict} — {fmt_bytes(est.peak_bytes)} of {fmt_bytes(est.capacity_bytes)} "
                      f"(headroom {fmt_bytes(est.headroom_bytes)})")
    for a in est.assumptions:
        console.print(f"[dim]· {a}[/dim]")


def render_fit(report, console: Console) -> None:
    if report.model_resolved_from:
        console.print(f"[dim]model {report.model_resolved_from}[/dim]")
    t = Table(title=f"{report.model} on {report.gpu} ({fmt_bytes(report.capacity_bytes)}), seq {report.seq}",
              header_style="bold")
    for col, just in (("method", "left"), ("fits", "center"), ("peak / capacity", "right"), ("max batch", "right"),
                      ("max seq (b=1)", "right"), ("recommended", "left")):
        t.add_column(col, justify=just)
    for r in report.rows:
        name = r.method + (f" ({r.adapter})" if r.adapter != r.method else "")
        colour = {"comfortable": "green", "tight": "yellow", "no": "red"}
        v = getattr(r, "verdict", None)
        verdict = (f"[{colour[v.value]}]{v.value}[/{colour[v.value]}]" if v is not None
                   else "[green]yes[/green]" if r.fits else "[red]no[/red]")
        s = r.settings
        rec = (f"GC {'on' if s['grad_ckpt'] else 'off'}, {s['optimizer']}, {s['precision']}, {s['attn']}"
               if r.fits else (r.notes[0] if r.notes else ""))
        t.add_row(name, verdict, f"{r.estimate.peak_gib:.2f} / {report.capacity_bytes / 2**30:.2f} GiB",
                  str(r.max_batch) if r.max_batch else "-", f"{r.max_seq:,}" if r.max_seq else "-", rec)
    console.print(t)
    for a in report.assumptions:
        console.print(f"[dim]· {a}[/dim]")


def render_models(models, console: Console) -> None:
    t = Table(title="models", header_style="bold")
    for col in ("name", "params", "layers", "hidden", "heads (kv)", "vocab", "aliases"):
        t.add_column(col)
    for m in models:
        t.add_row(m.name, fmt_count(m.params), str(m.num_layers), str(m.hidden_size), f"{m.num_heads} ({m.num_kv_heads})",
                  str(m.vocab_size), ", ".join(m.aliases))
    console.print(t)


def render_gpus(gpus, console: Console) -> None:
    t = Table(title="GPUs", header_style="bold")
    for col in ("name", "memory", "BF16 TF", "GB/s", "CC", "bf16", "flash", "aliases"):
        t.add_column(col)
    for g in gpus:
        t.add_row(g.name, fmt_bytes(g.memory_bytes), f"{g.bf16_tflops:g}", f"{g.bandwidth_gbs:g}", g.compute_capability,
                  "yes" if g.bf16 else "no", "yes" if g.flash_attention else "no", ", ".join(g.aliases))
    console.print(t)
