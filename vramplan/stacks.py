"""Training stacks (``--framework``) and memory-saving techniques (``--techniques``), as data.

Definitions live in ``vramplan/data/stacks.toml`` with the source of every claim; this
module validates them and answers the questions the analytic model asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ._data import load_data
from .errors import VramplanError, unknown
from .precision import RUNNERS

LOSSES = ("full_fp32", "chunked", "fused_linear")
#: the stack planned when none is named (``--framework``): HF transformers + PEFT + TRL
DEFAULT_STACK = "hf"


@dataclass(frozen=True)
class Stack:
    """One training stack of stacks.toml (HF+PEFT+TRL, torchtune, litgpt, Unsloth...): how it builds, casts and
    trains a model, the figures the planner reads from it, and how its dry run runs (:func:`get_stack`)."""

    name: str
    summary: str
    loss: str
    loss_chunks: int
    adapter_dtype: str
    peft_input_cast: bool
    kbit_upcast: bool
    gc_offload: bool
    frees_logits: bool
    default_precision: str
    runner: str
    techniques: tuple[str, ...]
    dryrun: str
    sources: tuple[str, ...]
    # optional (stacks.toml's header; the defaults are the HF stack's behaviour)
    gqa_expand_kv: bool = False
    rope_cache: tuple[tuple[str, int], ...] = ()      # (model_type, cache width in head_dims)
    rope_cache_per_layer: tuple[str, ...] = ()        # model builders with one RoPE module per layer
    nf4_adapted_only: tuple[str, ...] = ()            # model builders that quantise only adapted linears
    dequant_temp: tuple[int, int] = (0, 1)            # (bytes per weight, copies in the compute dtype)
    chunked_output: bool = False
    norm_fp32: bool = False                           # RMSNorm applies its weight in fp32
    loss_upcast: bool = True                          # the chunked loss upcasts each chunk to fp32
    loss_chunk_tokens: int = 0                        # tokens per loss chunk (0: loss_chunks equal chunks)
    untied_embeddings: bool = False                   # a separate lm_head even where the checkpoint ties it
    lora_qkv_pad: bool = False                        # fused-qkv LoRA zero-pads partially adapted q/k/v
    mixed_frozen_dtype: str | None = None             # frozen base dtype under a *-mixed regime (None: the regime's)
    quantizes_head: bool = False                      # QLoRA quantises the (untied) lm_head too
    fused_lora_layers: bool = False                   # the stack's own decoder-layer kernels (Unsloth fast_lora)
    keeps_last_graph: bool = False                    # the loop holds the last step's loss/logits into the next forward
    float_quant_storage: bool = False                 # QLoRA packs 4-bit weights in a floating dtype (quant_storage)
    fused_activation: bool = False                    # its own model runs the MLP activation as one op (litgpt F.gelu)
    transformers_modules: bool = False                # it trains transformers' own modeling code (its attention calls)
    softcap_by_hand: bool = False                     # its own attention computes soft-capped scores by hand (eager)
    bnb_exact_linear: bool = False                    # its 4-bit conversion replaces exact nn.Linear only (transformers >= 5)
    accumulation_no_sync: bool = False                # accumulation micro-batches skip the gradient sync (DDP/FSDP no_sync)
    fsdp_engine: str = "fsdp2"                        # --strategy fsdp runs FSDP2 (fully_shard) or FSDP1 (FullyShardedDataParallel)
    fsdp1_sync_module_states: bool = False            # FSDP1 wraps a rank-0-loaded model with sync_module_states=True
    # the dry run (stacks.toml's header): its runtime module, what it builds, its packages and techniques
    runtime: str = ""                                 # module of vramplan.runtime.stacks or dotted path ("": name)
    dryrun_builds: str = ""
    dryrun_package: str = ""
    dryrun_versions: tuple[str, ...] = ()
    dryrun_techniques: tuple[tuple[str, str], ...] = ()
    dryrun_refusal: str = "it cannot run on this machine"

    def as_built(self, model):
        """``model`` as this stack builds it: untied embeddings where the stack never ties them."""
        if self.untied_embeddings and model.tie_embeddings:
            from dataclasses import replace

            return replace(model, tie_embeddings=False)
        return model

    def rope_cache_bytes(self, model, peft: bool) -> int:
        """Bytes of the fp32 RoPE cache buffers of one model copy (0 when the stack keeps none)."""
        width = dict(self.rope_cache).get(model.model_type, 0)
        if not width:
            return 0
        modules = model.num_layers if torchtune_builder(model, peft) in self.rope_cache_per_layer else 1
        # cache [max_seq_len, width x head_dim] plus theta [head_dim // 2], both fp32
        return modules * 4 * (model.max_position_embeddings * width * model.head_dim + model.head_dim // 2)

    def quantises_only_adapted(self, model) -> bool:
        return torchtune_builder(model, True) in self.nf4_adapted_only


def torchtune_builder(model, peft: bool) -> str:
    """The torchtune component builder the torchtune stack builds ``model`` with (``lora_`` + family
    for adapters; the dry run's :mod:`vramplan.runtime.stacks.torchtune` builds with it): Llama with tied
    embeddings -> ``llama3_2``, with llama3-scaled RoPE -> ``llama3_1``, else ``llama3``."""
    family = {"llama": "llama3"}.get(model.model_type, model.model_type)
    if family == "llama3":
        hc = model.hf_config or {}
        rs = hc.get("rope_scaling") or hc.get("rope_parameters") or {}
        scaled = isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "llama3"
        family = "llama3_2" if model.tie_embeddings else ("llama3_1" if scaled else "llama3")
    return ("lora_" if peft else "") + family


@dataclass(frozen=True)
class Technique:
    """A memory-saving technique: what it does, and the step time it adds (fractions, sourced).

    ``cost`` is the fraction of step time added without gradient checkpointing and
    ``cost_with_ckpt`` with it (activation offloading moves only the layer inputs then;
    selective checkpointing changes nothing). ``saver`` is False for a setting that costs
    memory (padding): the recommender never proposes it.
    """

    name: str
    summary: str
    cost: float
    source: str
    label: str = ""
    cost_with_ckpt: float | None = None
    cost_source: str = ""
    saver: bool = True

    def cost_for(self, cfg) -> float:
        """Fraction of step time this technique adds to ``cfg`` (a :class:`~vramplan.config.TrainConfig`)."""
        if cfg.grad_ckpt and self.cost_with_ckpt is not None:
            return self.cost_with_ckpt
        return self.cost


def _raw() -> dict:
    return load_data("stacks.toml")


@lru_cache(maxsize=None)
def techniques() -> dict[str, Technique]:
    out = {}
    for name, t in _raw().get("techniques", {}).items():
        try:
            ckpt = t.get("cost_with_ckpt")
            out[name] = Technique(name, str(t["summary"]), float(t["cost"]), str(t["source"]),
                                  label=str(t.get("label", name)),
                                  cost_with_ckpt=None if ckpt is None else float(ckpt),
                                  cost_source=str(t.get("cost_source", "")), saver=bool(t.get("saver", True)))
        except (KeyError, ValueError, TypeError) as exc:
            raise VramplanError(f"stacks.toml: technique {name!r} is invalid ({exc})") from None
        if not 0.0 <= out[name].cost < 10.0 or not 0.0 <= (out[name].cost_with_ckpt or 0.0) < 10.0:
            raise VramplanError(f"stacks.toml: technique {name!r} has a cost outside [0, 10)")
    return out


@lru_cache(maxsize=None)
def stacks() -> dict[str, Stack]:
    out = {}
    for name, s in _raw().items():
        if name in ("techniques", "behaviours"):
            continue
        try:
            st = Stack(name=name, summary=str(s["summary"]), loss=str(s["loss"]), loss_chunks=int(s["loss_chunks"]),
                       adapter_dtype=str(s["adapter_dtype"]), peft_input_cast=bool(s["peft_input_cast"]),
                       kbit_upcast=bool(s["kbit_upcast"]), gc_offload=bool(s["gc_offload"]),
                       frees_logits=bool(s["frees_logits"]), default_precision=str(s["default_precision"]),
                       runner=str(s["runner"]), techniques=tuple(s.get("techniques", ())), dryrun=str(s["dryrun"]),
                       sources=tuple(s["sources"]), gqa_expand_kv=_flag(s, "gqa_expand_kv"),
                       rope_cache=tuple((str(k), int(v)) for k, v in dict(s.get("rope_cache", {})).items()),
                       rope_cache_per_layer=_names(s, "rope_cache_per_layer"),
                       nf4_adapted_only=_names(s, "nf4_adapted_only"),
                       dequant_temp=tuple(int(v) for v in s.get("dequant_temp", (0, 1))),
                       chunked_output=_flag(s, "chunked_output"), norm_fp32=_flag(s, "norm_fp32"),
                       loss_upcast=_flag(s, "loss_upcast", True),
                       loss_chunk_tokens=int(s.get("loss_chunk_tokens", 0)),
                       untied_embeddings=_flag(s, "untied_embeddings"), lora_qkv_pad=_flag(s, "lora_qkv_pad"),
                       mixed_frozen_dtype=s.get("mixed_frozen_dtype"), quantizes_head=_flag(s, "quantizes_head"),
                       keeps_last_graph=_flag(s, "keeps_last_graph"),
                       float_quant_storage=_flag(s, "float_quant_storage"),
                       fused_lora_layers=_flag(s, "fused_lora_layers"), fused_activation=_flag(s, "fused_activation"),
                       bnb_exact_linear=_flag(s, "bnb_exact_linear"),
                       accumulation_no_sync=_flag(s, "accumulation_no_sync"),
                       fsdp_engine=str(s.get("fsdp_engine", "fsdp2")),
                       fsdp1_sync_module_states=_flag(s, "fsdp1_sync_module_states"),
                       transformers_modules=_flag(s, "transformers_modules"),
                       softcap_by_hand=_flag(s, "softcap_by_hand"),
                       runtime=str(s.get("runtime", name)), dryrun_builds=str(s.get("dryrun_builds", name)),
                       dryrun_package=str(s.get("dryrun_package", "")), dryrun_versions=_names(s, "dryrun_versions"),
                       dryrun_techniques=tuple((str(k), str(v))
                                               for k, v in dict(s.get("dryrun_techniques", {})).items()),
                       dryrun_refusal=str(s.get("dryrun_refusal", "it cannot run on this machine")))
        except (KeyError, ValueError, TypeError) as exc:
            raise VramplanError(f"stacks.toml: stack {name!r} is invalid ({exc})") from None
        if len(st.dequant_temp) != 2 or min(st.dequant_temp) < 0 or any(w < 1 for _, w in st.rope_cache):
            raise VramplanError(f"stacks.toml: stack {name!r} has a bad dequant_temp or rope_cache")
        if st.loss_chunk_tokens < 0 or ((st.loss_chunk_tokens or not st.loss_upcast) and st.loss != "chunked"):
            raise VramplanError(f"stacks.toml: stack {name!r}: loss_chunk_tokens and loss_upcast describe a chunked loss")
        if st.loss not in LOSSES or st.loss_chunks < 1 or (st.runner not in RUNNERS and st.runner != "regime"):
            raise VramplanError(f"stacks.toml: stack {name!r} has a bad loss, loss_chunks or runner")
        if st.fsdp_engine not in ("fsdp1", "fsdp2"):
            raise VramplanError(f"stacks.toml: stack {name!r}: fsdp_engine must be fsdp1 or fsdp2")
        if any(how not in ("traced", "emulated") for _, how in st.dryrun_techniques):
            raise VramplanError(f"stacks.toml: stack {name!r}: a dryrun_techniques value is not traced or emulated")
        bad = [t for t in st.techniques + tuple(t for t, _ in st.dryrun_techniques) if t not in techniques()]
        if bad:
            raise VramplanError(f"stacks.toml: stack {name!r} names unknown technique {bad[0]!r}")
        out[name] = st
    return out


def _flag(s: dict, key: str, default: bool = False) -> bool:
    v = s.get(key, default)
    if not isinstance(v, bool):
        raise TypeError(f"{key} must be true or false")
    return v


def _names(s: dict, key: str) -> tuple[str, ...]:
    v = s.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"{key} must be a list of names")
    return tuple(v)


def get_stack(name: str) -> Stack:
    if not isinstance(name, str):
        raise VramplanError(f"framework must be a name (a string), got {type(name).__name__}",
                            "valid: " + ", ".join(stacks()))
    try:
        return stacks()[name.lower()]
    except KeyError:
        raise unknown("framework", name, stacks()) from None


def parse_techniques(value) -> tuple[str, ...]:
    """``"chunked_ce,act_offload"`` or a sequence -> validated, de-duplicated names."""
    if value is None or isinstance(value, (str, list, tuple)) and not value:
        return ()
    if not isinstance(value, (str, list, tuple, set, frozenset)) or not isinstance(value, str) and not all(
            isinstance(t, str) for t in value):
        raise VramplanError(f"techniques must be a comma list or a list of names, got {type(value).__name__}")
    items = [t.strip() for t in value.split(",")] if isinstance(value, str) else [str(t) for t in value]
    out: list[str] = []
    for t in items:
        t = t.replace("-", "_")
        if not t:
            continue
        if t not in techniques():
            raise unknown("technique", t, techniques())
        if t not in out:
            out.append(t)
    if "chunked_ce" in out and "liger_ce" in out:
        raise VramplanError("chunked_ce and liger_ce are two ways to compute the same loss", "choose one")
    return tuple(out)


def effective_regime(precision: str, framework: str):
    """The precision regime as ``framework`` runs it: adapter dtype and optimizer kernel per the stack."""
    from dataclasses import replace

    from .precision import get_regime

    regime = get_regime(precision)
    st = get_stack(framework)
    adapter = regime.compute_dtype if st.adapter_dtype == "regime" else st.adapter_dtype
    runner = regime.runner if st.runner == "regime" else st.runner
    frozen = regime.frozen_dtype
    if regime.autocast is not None and st.mixed_frozen_dtype:
        frozen = st.mixed_frozen_dtype  # litgpt bf16-mixed: Fabric keeps every parameter fp32 (stacks.toml)
    return replace(regime, adapter_dtype=adapter, runner=runner, frozen_dtype=frozen)


# -- version-dependent behaviour (stacks.toml [behaviours]) ---------------------------------

@dataclass(frozen=True)
class Behaviour:
    """A behaviour of one package that changed at a version: on for versions before ``before``."""

    name: str
    package: str
    before: str
    stacks: tuple[str, ...]
    summary: str
    source: str


def release(v: str) -> tuple[int, ...]:
    """The release numbers of version ``v``: ``"0.43.2"`` -> (0, 43, 2); a leading ``v``, pre-release and local
    suffixes are dropped (``"2.4.0.dev2024"``, ``"5.3.0rc1+cpu"`` -> (2, 4, 0), (5, 3, 0)); ``()`` when none can
    be read. The one parser of versions (stacks' behaviours, the runtime's minimum versions)."""
    import re

    out = []
    for part in str(v).strip().lstrip("v").split("+")[0].split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group(0)))
    return tuple(out)


def _vtuple(v: str) -> tuple[int, ...]:
    """:func:`release`, refusing a version with no release numbers."""
    out = release(v)
    if not out:
        raise VramplanError(f"cannot read version {v!r}", "use numbers such as 0.42.0")
    return out


@lru_cache(maxsize=None)
def behaviours() -> dict[str, Behaviour]:
    out = {}
    for name, b in dict(_raw().get("behaviours", {})).items():
        try:
            out[name] = Behaviour(name=name, package=str(b["package"]), before=str(b["before"]),
                                  stacks=_names(b, "stacks"), summary=str(b["summary"]), source=str(b["source"]))
            _vtuple(out[name].before)
        except (KeyError, TypeError) as exc:
            raise VramplanError(f"stacks.toml: behaviour {name!r} is invalid ({exc})") from None
    return out


@lru_cache(maxsize=None)
def installed_version(package: str) -> str | None:
    """The installed version of ``package`` from its metadata (never imports it), or None.

    The answer of ``importlib.metadata.version``; the common layout (``.dist-info`` folders on
    ``sys.path``) is read directly (:func:`_dist_info_version`); anything else asks it.

    Why not simply ``importlib.metadata``: importing it pulls in ``email``, ``zipfile``, ``csv`` and
    ``importlib.resources``, about 17 ms of CPU on the 2-core reference machine after ``vramplan.cli`` is
    loaded (``python -X importtime``; each lookup then costs ~0.9 ms against ~0.6 ms here). That is ~7% of
    ``import vramplan.cli`` (~0.23 s CPU) and ~6% of ``fit``'s 0.3 s target, which a plan pays on every CLI
    call (the stacks' version-dependent behaviours read it). Equality with ``importlib.metadata.version``
    for every installed distribution and spelling: tests/test_installed_version.py.
    """
    found, version = _dist_info_version(package)
    if found:
        return version
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # pragma: no cover - a broken distribution
        return None


def _normal_name(name: str) -> str:
    """A distribution name as ``importlib.metadata`` compares it (PEP 503, ``-`` as ``_``)."""
    import re

    return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")


def _dist_info_version(package: str) -> tuple[bool, str | None]:
    """(settled, version): ``importlib.metadata.version(package)`` where the answer is plain to see.

    It searches ``sys.path`` in order for the first ``<name>-<version>.dist-info`` folder whose
    normalised name is ``package``'s and reads the ``Version`` header of its ``METADATA``, as
    ``importlib.metadata``'s path finder does. Settled False (ask ``importlib.metadata``) when
    anything else could answer first: another distribution finder on ``sys.meta_path``, a zip or
    ``.egg`` on ``sys.path``, an ``.egg-info`` of that name, or an unreadable ``METADATA``.
    """
    import os
    import sys

    for finder in sys.meta_path:
        if getattr(finder, "find_distributions", None) is not None and getattr(finder, "__name__", "") != "PathFinder":
            return False, None
    want = _normal_name(package)
    for entry in sys.path:
        root = entry or "."
        if not isinstance(entry, str) or entry.lower().endswith(".egg") or os.path.isfile(root):
            return False, None
        try:
            st = os.stat(root)
            index = _metadata_folders(root, (st.st_dev, st.st_ino, st.st_mtime_ns))
        except OSError:
            continue  # not a folder (a path hook's name): importlib.metadata finds nothing there either
        child = index.get(want)
        if child is not None:
            if child.lower().endswith(".egg-info"):
                return False, None
            try:
                with open(os.path.join(root, child, "METADATA"), encoding="utf-8") as fh:
                    for line in fh:
                        if not line.strip():
                            break
                        key, sep, value = line.partition(":")
                        if sep and key.strip().lower() == "version":
                            return True, value.strip()
            except OSError:
                pass
            return False, None
    return True, None


@lru_cache(maxsize=64)
def _metadata_folders(root: str, stamp: tuple[int, int, int]) -> dict[str, str]:
    """Normalised distribution name -> the first ``.dist-info``/``.egg-info`` folder of that name in
    ``root`` (``os.listdir`` order), for :func:`_dist_info_version`: one listing per folder, keyed by
    its (device, inode, modification time) ``stamp`` (a package installed meanwhile changes the
    folder's mtime, another working directory behind ``"."`` its inode, so either is listed afresh).
    Raises OSError where ``root`` cannot be listed."""
    import os

    out: dict[str, str] = {}
    for child in os.listdir(root):
        low = child.lower()
        if low.endswith((".dist-info", ".egg-info")):
            out.setdefault(_normal_name(low.rpartition(".")[0].partition("-")[0]), child)
    return out


def package_version(package: str, versions=()) -> tuple[str | None, str]:
    """(version, how): the version given in ``versions`` (``--stack-version``), else the installed one,
    else None (the latest behaviour)."""
    given = dict(versions).get(package)
    if given == "latest":
        return None, "latest"
    if given:
        return str(given), "given"
    inst = installed_version(package)
    if inst:
        return inst, "installed"
    return None, "latest"


@lru_cache(maxsize=4096)
def behaviour_on(name: str, framework: str, versions=()) -> bool:
    """Whether behaviour ``name`` applies to ``framework`` at the package version in use (given, else
    installed, else latest: off)."""
    b = behaviours()[name]
    if framework not in b.stacks:
        return False
    v, _ = package_version(b.package, versions)
    return v is not None and _vtuple(v) < _vtuple(b.before)


def parse_versions(value) -> tuple[tuple[str, str], ...]:
    """``--stack-version``: ``"bitsandbytes=0.42.0,transformers=4.38"``, a dict, or pairs -> sorted pairs.

    Raises:
        VramplanError: an item without ``=`` or a version that is not numeric.
    """
    if not value:
        return ()
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        items = []
        for part in value.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise VramplanError(f"--stack-version item {part.strip()!r} is not package=version",
                                    "e.g. --stack-version bitsandbytes=0.42.0,transformers=4.38.2")
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    else:
        items = [tuple(x) for x in value]
    out = []
    for k, v in items:
        if str(v) != "latest":
            _vtuple(v)
        out.append((str(k).lower(), str(v)))
    return tuple(sorted(out))
