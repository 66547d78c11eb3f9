"""Calibration suites: which models, methods and shapes to measure (data in ``calibrate/``).

A suite is a TOML file, validated on load::

    schema = 1
    name = "standard"
    summary = "..."
    warmup = 2            # untimed steps per point (step 1 allocates optimiser states)
    steps = 3             # timed steps per point
    holdout_every = 4     # every 4th point of a model x method group is held out of the fit
    time_budget_s = 900   # expected wall time (a guide, reported; the run is never cut short)
    dryrun = "first"      # record the dry run's tensor accounting: "all" points, the "first" of each
                          # model x method group, or "none" (true / false mean all / none)

    [defaults]            # make_config keywords every point starts from
    precision = "bf16-mixed"

    [models."qwen2.5-0.5b"]
    source = "https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json"
    config = { model_type = "qwen2", hidden_size = 896, ... }   # an HF config.json dict
    # or: catalogue = "qwen2.5-0.5b"  (a vramplan catalogue name, resolved with get_model)

    [[grid]]              # the cartesian product of every list below
    models = ["qwen2.5-0.5b"]
    methods = ["full", "lora", "dpo+qlora"]     # method, or method+adapter
    batch = [1, 4]
    seq = [512, 2048]
    grad_ckpt = [false, true]                   # optional, as are optimizer, precision, attn, rank
    quick = true          # part of the --quick subset
    split = "holdout"     # optional: every point of this grid is held out of the fit

    [[search]]            # find the largest batch or seq that fits
    model = "qwen2.5-0.5b"
    method = "lora"
    vary = "seq"          # or "batch"
    batch = 4             # the other dimension, fixed
    start = 2048
    max = 131072
    granularity = 256     # sizes probed are multiples of this

Models are built from their config with random weights, so nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._data import read_config_file
from ..config import TrainConfig, make_config
from ..errors import VramplanError
from ..methods import all_options, parse_recipe_name
from ..models import ModelSpec, from_hf_config, get_model

SUITE_SCHEMA = 1
SUITE_DIR = Path(__file__).resolve().parent.parent.parent / "calibrate"
GRID_LIST_KEYS = ("batch", "seq", "grad_ckpt", "optimizer", "precision", "attn", "rank")
GRID_KEYS = {"models", "methods", "quick", "split", "targets", "alpha", "double_quant", "ppo_response", "dropout",
             *GRID_LIST_KEYS}
SEARCH_KEYS = {"model", "method", "vary", "batch", "seq", "start", "max", "granularity", "quick", "grad_ckpt",
               "optimizer", "precision", "attn", "rank", "targets"}
TOP_KEYS = {"schema", "name", "summary", "warmup", "steps", "holdout_every", "time_budget_s", "defaults", "models",
            "grid", "search", "device", "dryrun"}
SPLITS = ("fit", "holdout")


@dataclass(frozen=True)
class Point:
    """One configuration to measure."""

    id: str
    model: str
    spec: ModelSpec
    config: TrainConfig
    split: str = "fit"
    quick: bool = False
    warmup: int = 2
    steps: int = 3

    @property
    def method_key(self) -> str:
        """``lora``, ``dpo``, ``dpo+qlora``: the key of per-method fits (the recipe name)."""
        return self.config.recipe.name

    def describe(self) -> str:
        c = self.config
        gc = " gc" if c.grad_ckpt else ""
        return f"{self.model} {self.method_key} b{c.batch} s{c.seq}{gc} {c.optimizer}"


@dataclass(frozen=True)
class SearchSpec:
    """A search of the largest ``vary`` (batch or seq) that fits, the other dimension fixed."""

    id: str
    model: str
    spec: ModelSpec
    method: str
    adapter: str | None
    vary: str
    fixed: int
    start: int
    max: int
    granularity: int
    options: dict = field(default_factory=dict)
    quick: bool = False

    def config(self, size: int) -> TrainConfig:
        """The configuration probed at ``size``."""
        batch, seq = (size, self.fixed) if self.vary == "batch" else (self.fixed, size)
        return make_config(self.spec, self.method, adapter=self.adapter, batch=batch, seq=seq, **self.options)

    def point(self, size: int) -> Point:
        cfg = self.config(size)
        return Point(id=point_id(self.model, self.spec, cfg), model=self.model, spec=self.spec, config=cfg,
                     split="search", quick=self.quick, warmup=1, steps=1)

    def describe(self) -> str:
        other = "seq" if self.vary == "batch" else "batch"
        return f"largest {self.vary} for {self.model} {self.method}{'+' + self.adapter if self.adapter else ''} at {other} {self.fixed}"


@dataclass(frozen=True)
class Suite:
    name: str
    path: str
    summary: str
    points: tuple[Point, ...]
    searches: tuple[SearchSpec, ...]
    models: dict[str, ModelSpec]
    warmup: int
    steps: int
    time_budget_s: float | None = None
    device: str | None = None
    dryrun: str = "first"

    def dryrun_ids(self, mode: str | bool | None = None) -> set[str]:
        """Ids of the points whose dry-run accounting is recorded under ``mode`` (default: the suite's)."""
        mode = _dryrun_mode(self.dryrun if mode is None else mode)
        if mode == "none":
            return set()
        if mode == "all":
            return {p.id for p in self.points}
        seen, out = set(), set()
        for p in self.points:
            key = (p.model, p.method_key)
            if key not in seen:
                seen.add(key)
                out.add(p.id)
        return out

    def quick_subset(self) -> "Suite":
        """The points and searches marked ``quick = true``."""
        pts = tuple(p for p in self.points if p.quick)
        srch = tuple(s for s in self.searches if s.quick)
        if not pts:
            raise VramplanError(f"suite {self.name} marks no grid as quick = true", "drop --quick or use --suite quick")
        return Suite(self.name + "-quick", self.path, self.summary, pts, srch, self.models, self.warmup, self.steps,
                     self.time_budget_s, self.device, self.dryrun)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def point_id(model: str, spec: ModelSpec, cfg: TrainConfig) -> str:
    """A readable, content-addressed id: the same model config and TrainConfig give the same id."""
    d = cfg.to_dict()
    h = _hash({"model": spec.hf_config or spec.name, "config": d})
    gc = "/gc" if cfg.grad_ckpt else ""
    return f"{model}/{cfg.recipe.name}/b{cfg.batch}s{cfg.seq}{gc}/{cfg.optimizer}/{cfg.precision}#{h}"


def resolve_suite_path(suite: str | Path) -> Path:
    """A suite file path, or a name in ``calibrate/`` (``standard``, ``quick``, ``cpu``)."""
    p = Path(suite).expanduser()
    if p.is_file():
        return p
    for cand in (SUITE_DIR / f"{suite}.toml", SUITE_DIR / str(suite), Path.cwd() / "calibrate" / f"{suite}.toml"):
        if cand.is_file():
            return cand
    names = sorted(x.stem for x in SUITE_DIR.glob("*.toml")) if SUITE_DIR.is_dir() else []
    raise VramplanError(f"no calibration suite {str(suite)!r}",
                        f"give a .toml path{' or one of ' + ', '.join(names) if names else ''}")


def _err(path: Path, msg: str, hint: str | None = None) -> VramplanError:
    return VramplanError(f"suite {path.name}: {msg}", hint)


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def load_suite(suite: str | Path) -> Suite:
    """Load and validate a suite; every point is checked with ``make_config`` up front.

    Raises:
        VramplanError: an unreadable file, an unknown key, model or method, a bad shape.
    """
    path = resolve_suite_path(suite)
    raw = read_config_file(path)
    unknown_keys = set(raw) - TOP_KEYS
    if unknown_keys:
        raise _err(path, f"unknown key {sorted(unknown_keys)[0]!r}", f"known keys: {', '.join(sorted(TOP_KEYS))}")
    if raw.get("schema", SUITE_SCHEMA) != SUITE_SCHEMA:
        raise _err(path, f"schema {raw.get('schema')!r} is not {SUITE_SCHEMA}")
    name = str(raw.get("name") or path.stem)
    warmup, steps = raw.get("warmup", 2), raw.get("steps", 3)
    holdout_every = raw.get("holdout_every", 0)
    for label, v, lo in (("warmup", warmup, 1), ("steps", steps, 1), ("holdout_every", holdout_every, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _err(path, f"{label} must be an integer >= {lo}, got {v!r}")
    defaults = raw.get("defaults", {})
    if not isinstance(defaults, dict):
        raise _err(path, "[defaults] must be a table")

    models: dict[str, ModelSpec] = {}
    for mname, entry in (raw.get("models") or {}).items():
        if not isinstance(entry, dict):
            raise _err(path, f"model {mname!r} must be a table")
        if "config" in entry:
            if not isinstance(entry["config"], dict):
                raise _err(path, f"model {mname!r}: config must be a table (an HF config.json dict)")
            models[mname] = from_hf_config(dict(entry["config"]), name=mname, source=entry.get("source"))
        elif "catalogue" in entry:
            models[mname] = get_model(entry["catalogue"])
        else:
            raise _err(path, f"model {mname!r} needs config = {{...}} or catalogue = NAME")
    if not models:
        raise _err(path, "lists no [models.NAME]")

    points: dict[str, Point] = {}
    grids = raw.get("grid") or []
    if not isinstance(grids, list) or not grids:
        raise _err(path, "needs at least one [[grid]]")
    for gi, g in enumerate(grids):
        if not isinstance(g, dict):
            raise _err(path, f"grid {gi + 1} must be a table")
        option_names = {o.name for o in all_options()}  # each method's own options (vramplan.methods)
        bad = set(g) - GRID_KEYS - option_names
        if bad:
            raise _err(path, f"grid {gi + 1}: unknown key {sorted(bad)[0]!r}", f"known keys: {', '.join(sorted(GRID_KEYS))}")
        split = g.get("split", "fit")
        if split not in SPLITS:
            raise _err(path, f"grid {gi + 1}: split must be fit or holdout, got {split!r}")
        for k in ("models", "methods", "batch", "seq"):
            if k not in g:
                raise _err(path, f"grid {gi + 1} lacks {k}")
        mnames = _as_list(g["models"])
        for m in mnames:
            if m not in models:
                raise _err(path, f"grid {gi + 1}: unknown model {m!r}", f"define [models.\"{m}\"]")
        lists = {k: _as_list(g[k]) for k in GRID_LIST_KEYS if k in g}
        scalars = {k: g[k] for k in ("targets", "alpha", "double_quant", "ppo_response", "dropout") if k in g}
        own = {k: g[k] for k in sorted(option_names - GRID_KEYS) if k in g}
        if own:
            scalars["method_options"] = own
        keys = list(lists)
        for m, meth, combo in itertools.product(mnames, _as_list(g["methods"]), itertools.product(*lists.values())):
            opts = {**defaults, **scalars, **dict(zip(keys, combo))}
            method, adapter = parse_recipe_name(meth)
            try:
                cfg = make_config(models[m], method, adapter=adapter, **opts)
            except VramplanError as exc:
                raise _err(path, f"grid {gi + 1}, {m} {meth} {opts}: {exc}") from None
            except TypeError as exc:
                raise _err(path, f"grid {gi + 1}: bad option ({exc})") from None
            pid = point_id(m, models[m], cfg)
            prev = points.get(pid)
            pt = Point(pid, m, models[m], cfg, split, bool(g.get("quick", False)) or (prev.quick if prev else False),
                       warmup, steps)
            if prev is not None and prev.split == "holdout":
                pt = Point(pid, m, models[m], cfg, "holdout", pt.quick, warmup, steps)
            points[pid] = pt
    pts = _assign_holdout(list(points.values()), holdout_every)

    searches = []
    for si, s in enumerate(raw.get("search") or []):
        if not isinstance(s, dict):
            raise _err(path, f"search {si + 1} must be a table")
        bad = set(s) - SEARCH_KEYS
        if bad:
            raise _err(path, f"search {si + 1}: unknown key {sorted(bad)[0]!r}", f"known keys: {', '.join(sorted(SEARCH_KEYS))}")
        if s.get("model") not in models:
            raise _err(path, f"search {si + 1}: unknown model {s.get('model')!r}")
        vary = s.get("vary")
        if vary not in ("batch", "seq"):
            raise _err(path, f"search {si + 1}: vary must be batch or seq, got {vary!r}")
        other = "seq" if vary == "batch" else "batch"
        vals = {k: s.get(k) for k in (other, "start", "max")}
        vals["granularity"] = s.get("granularity", 1)
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _err(path, f"search {si + 1}: {k} must be a positive integer, got {v!r}")
        if vals["start"] > vals["max"]:
            raise _err(path, f"search {si + 1}: start {vals['start']} exceeds max {vals['max']}")
        method, adapter = parse_recipe_name(s.get("method", "lora"))
        opts = {**defaults, **{k: s[k] for k in ("grad_ckpt", "optimizer", "precision", "attn", "rank", "targets") if k in s}}
        spec = SearchSpec(id="", model=s["model"], spec=models[s["model"]], method=method, adapter=adapter, vary=vary,
                          fixed=vals[other], start=vals["start"], max=vals["max"], granularity=vals["granularity"],
                          options=opts, quick=bool(s.get("quick", False)))
        try:
            cfg = spec.config(spec.start)
        except VramplanError as exc:
            raise _err(path, f"search {si + 1}: {exc}") from None
        sid = f"search:{s['model']}/{cfg.recipe.name}/{vary}@{other}{vals[other]}#{_hash([spec.model, cfg.to_dict(), vals])}"
        searches.append(SearchSpec(**{**spec.__dict__, "id": sid}))

    budget = raw.get("time_budget_s")
    return Suite(name=name, path=str(path), summary=str(raw.get("summary", "")), points=tuple(pts),
                 searches=tuple(searches), models=models, warmup=warmup, steps=steps,
                 time_budget_s=float(budget) if budget is not None else None, device=raw.get("device"),
                 dryrun=_dryrun_mode(raw.get("dryrun", "first"), path))


def _dryrun_mode(v: Any, path: Path | None = None) -> str:
    if v is True:
        return "all"
    if v is False:
        return "none"
    if v in ("all", "first", "none"):
        return str(v)
    raise VramplanError(f"{'suite ' + path.name + ': ' if path else ''}dryrun must be all, first or none, got {v!r}")


def _assign_holdout(points: list[Point], every: int) -> list[Point]:
    """Hold out every ``every``-th point of each model x method group (ordered by a hash of the id).

    Groups with fewer than two fit points keep them all, so every method gets fitted.
    """
    if every <= 1:
        return points
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(points):
        if p.split == "fit":
            groups.setdefault((p.model, p.method_key), []).append(i)
    out = list(points)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        order = sorted(idx, key=lambda i: hashlib.sha256(points[i].id.encode()).hexdigest())
        for k, i in enumerate(order):
            if k % every == every - 1:
                p = points[i]
                out[i] = Point(p.id, p.model, p.spec, p.config, "holdout", p.quick, p.warmup, p.steps)
    return out
