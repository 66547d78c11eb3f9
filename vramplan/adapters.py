"""Adapter parameter counts from the real target-module shapes (PEFT's layouts).

Sources (PEFT 0.13+ ``tuners/lora/layer.py``, ``tuners/ia3/layer.py``):
* LoRA on an ``in -> out`` linear: ``lora_A`` is ``r x in``, ``lora_B`` is ``out x r``,
  no bias (``bias="none"``): ``r * (in + out)`` parameters.
* DoRA (``use_dora=True``) adds ``lora_magnitude_vector``: one value per output feature.
* IA³ scales the output of a target (``out`` values), or the input of a feed-forward
  target (``in`` values).
Adapters are fp32 by default (``get_peft_model(..., autocast_adapter_dtype=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods import Adapter
from .models import ModelSpec


@dataclass(frozen=True)
class AdapterTensor:
    """One adapter tensor shape and how many exist in the model."""

    shape: tuple[int, ...]
    count: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.count


_TENSORS_CACHE: dict = {}


def adapter_tensors(model: ModelSpec, adapter: Adapter, rank: int, targets: tuple[str, ...]) -> list[AdapterTensor]:
    """Every trainable adapter tensor for ``adapter`` on ``model`` (empty for full training).

    Kept per ``(model, adapter, rank, targets)`` (what it reads; a search asks for the same few hundreds of
    times); each caller gets its own list. Unhashable arguments (a spec with list fields) are worked out each time.
    """
    key = (model, adapter, rank, targets)
    try:
        kept = _TENSORS_CACHE.get(key)
    except TypeError:
        return _adapter_tensors(model, adapter, rank, targets)
    if kept is None:
        if len(_TENSORS_CACHE) > 1024:
            _TENSORS_CACHE.clear()
        kept = _TENSORS_CACHE[key] = tuple(_adapter_tensors(model, adapter, rank, targets))
    return list(kept)


def _adapter_tensors(model: ModelSpec, adapter: Adapter, rank: int, targets: tuple[str, ...]) -> list[AdapterTensor]:
    """:func:`adapter_tensors` worked out."""
    if adapter is Adapter.FULL:
        return []
    layers = model.num_layers
    by_name = {l.name: l for l in model.layer_linears() if l.is_linear}
    out: list[AdapterTensor] = []
    for t in targets:
        l = by_name[t]
        n = layers * l.count
        if adapter.ia3:
            size = l.in_features if t in model.ia3_feedforward else l.out_features
            out.append(AdapterTensor((size,), n))
            continue
        out.append(AdapterTensor((rank, l.in_features), n))
        out.append(AdapterTensor((l.out_features, rank), n))
        if adapter.dora:
            out.append(AdapterTensor((l.out_features,), n))
    return out


def adapter_params(model: ModelSpec, adapter: Adapter, rank: int, targets: tuple[str, ...]) -> int:
    """Trainable adapter parameters, equal to PEFT's ``get_nb_trainable_parameters()[0]``."""
    return sum(t.numel for t in adapter_tensors(model, adapter, rank, targets))


def full_tensors(model: ModelSpec, head: str = "lm") -> list[tuple[tuple[int, ...], int]]:
    """Every parameter tensor of the model as ``(shape, count)`` -- what full training updates.

    ``head="scalar"`` replaces the untied lm_head by a ``1 x hidden`` score head (reward/value models).
    """
    h = model.hidden_size
    out: list[tuple[tuple[int, ...], int]] = [((model.vocab_size, h), 1)]
    if head == "scalar":
        out.append(((1, h), 1))
    elif not model.tie_embeddings:
        out.append(((model.vocab_size, h), 1))
        if model.lm_head_bias:
            out.append(((model.vocab_size,), 1))
    L = model.num_layers
    for l in model.layer_linears():
        shape = (l.count, l.out_features, l.in_features) if not l.is_linear and l.count > 1 else (l.out_features, l.in_features)
        out.append((shape, L))
        if l.bias:
            out.append(((l.out_features,), L * l.count))
    norm = [(h,)] * (model.norms_per_layer * model.norm_width_params)  # LayerNorm: a weight and a bias
    if model.qk_norm == "head":
        norm += [(model.head_dim,)] * 2
    elif model.qk_norm == "full":
        norm += [(model.q_dim,), (model.kv_dim,)]
    out += [(s, L) for s in norm]
    out += [((h,), 1)] * model.norm_width_params * (2 if model.embed_norm else 1)  # the final (and embedding) norm
    return out
