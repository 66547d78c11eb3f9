"""Result dataclasses shared by the analytic model, the dry run and calibration.

Bytes are ints. ``to_json()`` gives the ``--json`` object of the CLI contract; the
Python API returns these objects unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .taxonomy import Component, Phase, Quantity
from .units import GIB

if TYPE_CHECKING:  # annotations only: results sits below the modules that build an Estimate
    from .config import TrainConfig
    from .overheads import Overheads
    from .throughput import StepTime


def jsonable(obj: Any) -> Any:
    """Convert dataclasses, Enums (by value), tuples and numpy scalars to JSON-ready values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_json"):
            return obj.to_json()
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {jsonable(k) if isinstance(k, enum.Enum) else str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


@dataclass(frozen=True)
class Constraint:
    """A requirement of a configuration beside its step's peak (bytes): something else on the card that
    must fit in its own room (GRPO's colocated vLLM in its share). ``hard``: unmet, the run cannot start
    (the verdict is "no"); else, unmet, it runs degraded (the verdict is at most "tight"). ``text``: one
    line saying what is needed where."""

    name: str
    needed_bytes: int
    available_bytes: int
    hard: bool
    text: str

    @property
    def met(self) -> bool:
        return self.needed_bytes <= self.available_bytes

    def to_json(self) -> dict:
        return {"name": self.name, "needed_bytes": int(self.needed_bytes), "available_bytes": int(self.available_bytes),
                "hard": self.hard, "met": self.met, "text": self.text}


def json_text(obj: Any) -> str:
    """``json.dumps(obj, indent=2, allow_nan=False)``, to the byte, in about half its time.

    The standard encoder has no C path once ``indent`` is set, and walks the tree through nested
    generators; :class:`_JsonWriter` walks it with one call per container, writing leaves as
    ``json`` does (its own string escaping, ``int.__repr__``/``float.__repr__``; NaN and infinities
    refused). A value ``json`` would refuse, or a tree too deep to walk, is left to ``json.dumps``
    to raise its own error.

    Raises:
        ValueError: a NaN or infinity (as ``json.dumps(..., allow_nan=False)``). TypeError: a value
            that is not JSON.
    """
    import json

    writer = _JsonWriter()
    try:
        return writer.text(obj)
    except (_JsonRefused, RecursionError):
        return json.dumps(obj, indent=2, allow_nan=False)  # raises what json raises (or agrees)


_INF = float("inf")


class _JsonRefused(Exception):
    """A value :func:`json_text` leaves to ``json.dumps`` (which raises)."""


class _JsonWriter:
    """The text of ``json.dumps(obj, indent=2, allow_nan=False)`` (:func:`json_text`)."""

    def __init__(self):
        from json.encoder import encode_basestring_ascii

        self.quote = encode_basestring_ascii
        self.keys: dict[str, str] = {}  # a str key -> its text with the separator

    def text(self, obj: Any) -> str:
        t = self.leaf(obj)
        if t is not None:
            return t
        return self.container(obj, "")

    @staticmethod
    def number(v: float) -> str:
        if v != v or v == _INF or v == -_INF:
            raise _JsonRefused
        return float.__repr__(v)

    def leaf(self, v) -> str | None:
        """A scalar's text (json's order of checks), None for a container."""
        cls = type(v)
        if cls is float:
            return self.number(v)
        if cls is int:
            return int.__repr__(v)
        if isinstance(v, str):
            return self.quote(v)
        if v is None:
            return "null"
        if v is True:
            return "true"
        if v is False:
            return "false"
        if isinstance(v, int):
            return int.__repr__(v)
        if isinstance(v, float):
            return self.number(v)
        if isinstance(v, (list, tuple, dict)):
            return None
        raise _JsonRefused

    def key(self, k) -> str:
        if isinstance(k, str):
            return self.quote(k)
        if isinstance(k, float):
            return self.quote(self.number(k))
        if k is True or k is False or k is None:
            return self.quote({True: "true", False: "false", None: "null"}[k])
        if isinstance(k, int):
            return self.quote(int.__repr__(k))
        raise _JsonRefused

    def container(self, o, pad: str) -> str:
        """The text of a list, tuple or dict ``o`` whose opening bracket sits after ``pad``."""
        if not o:
            return "{}" if isinstance(o, dict) else "[]"
        if isinstance(o, dict):
            return self.walk_dict(o, pad)
        return self.walk_list(o, pad)

    def walk_dict(self, o: dict, pad: str) -> str:
        inner = pad + "  "
        keys, quote, items = self.keys, self.quote, []
        put = items.append
        for k, v in o.items():
            kt = keys.get(k) if type(k) is str else None
            if kt is None:  # a key's text ('"k": ') is kept: a report repeats the same few keys thousands of times
                kt = self.key(k) + ": "
                if type(k) is str:
                    keys[k] = kt
            cls = type(v)
            if cls is str:
                put(kt + quote(v))
            elif cls is int:
                put(kt + int.__repr__(v))
            elif cls is float:
                if v - v != 0.0:  # NaN or an infinity (x - x is 0.0 for every finite float)
                    raise _JsonRefused
                put(kt + float.__repr__(v))
            elif v is None:
                put(kt + "null")
            elif cls is bool:
                put(kt + ("true" if v else "false"))
            elif cls is dict or cls is list:
                put(kt + (self.walk_dict(v, inner) if cls is dict else self.walk_list(v, inner)) if v
                    else kt + ("{}" if cls is dict else "[]"))
            else:
                t = self.leaf(v)
                put(kt + (self.container(v, inner) if t is None else t))
        return "{\n" + inner + (",\n" + inner).join(items) + "\n" + pad + "}"

    def walk_list(self, o, pad: str) -> str:
        inner = pad + "  "
        quote, items = self.quote, []
        put = items.append
        for v in o:
            cls = type(v)
            if cls is str:
                put(quote(v))
            elif cls is int:
                put(int.__repr__(v))
            elif cls is float:
                if v - v != 0.0:
                    raise _JsonRefused
                put(float.__repr__(v))
            elif cls is dict:
                put(self.walk_dict(v, inner) if v else "{}")
            else:
                t = self.leaf(v)
                put(self.container(v, inner) if t is None else t)
        return "[\n" + inner + (",\n" + inner).join(items) + "\n" + pad + "]"


@dataclass
class Estimate:
    """A prediction of one configuration's peak memory (per GPU) and, with a GPU, its speed.

    ``components`` holds every tensor component at the peak phase plus the runtime
    components; ``tensor_peak_bytes`` is their tensor part (what ``max_memory_allocated``
    or the dry run measure), ``peak_bytes`` adds CUDA context, workspaces and allocator
    reserve (what nvidia-smi shows for the process: ``quantity``).
    """

    model: str
    method: str
    adapter: str
    config: TrainConfig
    params: int
    trainable_params: int
    components: dict[Component, int]
    phases: dict[Phase, int]
    peak_phase: Phase
    tensor_peak_bytes: int
    peak_bytes: int
    quantity: Quantity = Quantity.DEVICE_TOTAL
    gpu: str | None = None
    capacity_bytes: int | None = None
    fits: bool | None = None
    uncertainty_bytes: int = 0
    calibrated: bool = False
    assumptions: list[str] = field(default_factory=list)
    model_resolved_from: str | None = None
    extra: dict = field(default_factory=dict)
    #: GPUs and sharding strategy (``peak_bytes`` and ``capacity_bytes`` are per GPU).
    gpus: int = 1
    strategy: str | None = None
    offload: str = "none"
    #: Throughput with a GPU (``vramplan.throughput``): seconds per optimiser step, tokens/s of all GPUs.
    step_time_s: float | None = None
    tokens_per_s: float | None = None
    throughput: StepTime | None = None  # scalar
    #: With ``tokens``: seconds and GPU-hours to train ``tokens`` x ``epochs``.
    time_to_train_s: float | None = None
    gpu_hours: float | None = None
    #: How the runtime overheads were obtained (``vramplan.overheads.Overheads``): per figure
    #: calibrated or default, the profile file and its versions, the uncertainty band used.
    overheads: Overheads | None = None
    #: Requirements beside the step's peak (:class:`Constraint`), which the verdict reads with the peak.
    constraints: tuple[Constraint, ...] = ()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def verdict(self):
        """comfortable / tight / no on the card with the estimate's band (:func:`vramplan.verdict.verdict_of`);
        ``fits`` is the central prediction alone (``peak_bytes <= capacity_bytes``)."""
        from .verdict import verdict_of

        return verdict_of(self)

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.capacity_bytes is None else self.capacity_bytes - self.peak_bytes

    def to_json(self) -> dict:
        out = {
            "model": self.model,
            "model_resolved_from": self.model_resolved_from,
            "method": self.method,
            "adapter": self.adapter,
            "config": jsonable(self.config),
            "params": self.params,
            "trainable_params": self.trainable_params,
            "peak_bytes": int(self.peak_bytes),
            "peak_gib": round(self.peak_gib, 4),
            "tensor_peak_bytes": int(self.tensor_peak_bytes),
            "quantity": self.quantity.value,
            "peak_phase": self.peak_phase.value,
            "components": {c.value: int(v) for c, v in self.components.items()},
            "phases": {p.value: int(v) for p, v in self.phases.items()},
            "uncertainty_bytes": int(self.uncertainty_bytes),
            "calibrated": self.calibrated,
            "overheads": jsonable(self.overheads) if self.overheads is not None else None,
            "assumptions": list(self.assumptions),
        }
        if self.gpu is not None:
            out.update(gpu=self.gpu, capacity_bytes=int(self.capacity_bytes), fits=bool(self.fits),
                       headroom_bytes=int(self.headroom_bytes))
            v = self.verdict
            if v is not None:
                out["verdict"] = v.value
        if self.constraints:
            out["constraints"] = [c.to_json() for c in self.constraints]
        out.update(gpus=self.gpus, strategy=self.strategy, offload=self.offload)
        if self.tokens_per_s is not None:
            out.update(tokens_per_s=round(float(self.tokens_per_s), 1), step_time_s=round(float(self.step_time_s), 6),
                       throughput=jsonable(self.throughput))
        if self.time_to_train_s is not None:
            out.update(time_to_train_s=round(float(self.time_to_train_s), 1), gpu_hours=round(float(self.gpu_hours), 3))
        out.update(jsonable(self.extra))
        return out
