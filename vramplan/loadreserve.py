"""Memory a stack's model load leaves reserved: its transients replayed through the caching allocator.

The allocator keeps every block a load frees (nothing calls ``empty_cache``), so a load whose transients
are far larger than what stays allocated sets a floor under every later ``max_memory_reserved`` and
device total. One such load is modelled (stacks.toml ``[behaviours.torchao_nf4_unchunked_load]``):

torchtune < 0.2.0 (which pins ``torchao==0.1``) builds a QLoRA model directly on the GPU
(``lora_finetune_single_device._setup_model``: ``with set_default_dtype(bf16), device: instantiate``).
Its ``LoRALinear(quantize_base=True)`` makes a bf16 ``nn.Linear`` on the GPU and quantises it with
``to_nf4``; ``lora_llama2`` builds one template layer and ``TransformerDecoder`` deep-copies it per layer
(``_get_clones``), which for an NF4 weight runs torchtune's ``clone`` override: ``to_nf4(
get_original_weight())``; the template is freed when the builder returns. ``load_state_dict`` then copies
each checkpoint weight into its NF4 parameter through torchtune's ``copy_`` override: ``to_nf4(src.to(
device))``, replacing the old NF4 pieces. torchao 0.1's ``NF4Tensor.from_tensor`` finds each element's
nearest NF4 value over the whole tensor at once (``quantize_tensor_nearest``: ``(value - nf4).abs()``, two
(n, 16) bf16 tensors, then ``min(dim=-1)``'s values and int64 indices); torchao PR #196 (6081796b,
2024-05-01, first in 0.2.0) does it in 1M-element chunks. The replay below allocates and frees, in that
order, every tensor of those functions (torchtune v0.1.0, torchao 8713b7d2 = v0.1) through
:class:`vramplan.allocsim.CachingAllocator` and returns the reserved total at the end of the load.

Checked against the one published figure: torchtune's QLoRA tutorial (v0.1.0) prints "Peak memory reserved,
model init" 9.13 GB for Llama-2-7B (``7B_qlora_single_device``); the replay gives 9.12 GB (4.18 GB allocated).
Without the per-layer clones it would be 7.72 GB, without the allocator's fragmentation (allocated plus
the largest transient) about 7.3 GB.
"""

from __future__ import annotations

from functools import lru_cache

from .allocsim import CachingAllocator

_NF4_TABLE = 16 * 2  # torchao's 16 NF4 code values, bf16


class _Replay:
    """Tensors as allocator handles: ``new(nbytes)`` -> handle, ``drop(*handles)``."""

    def __init__(self) -> None:
        self.a = CachingAllocator()

    def new(self, nbytes: int) -> int:
        return self.a.malloc(int(nbytes))

    def drop(self, *handles: int) -> None:
        for h in handles:
            self.a.free(h)

    def block_absmax(self, n: int, block: int) -> int:
        """torchao get_block_absmax: ``blocks.abs().max(dim=1).values`` of a bf16 tensor of n elements."""
        absolute = self.new(2 * n)
        values, indices = self.new(2 * n // block), self.new(8 * n // block)
        self.drop(absolute, indices)
        return values

    def to_nf4(self, n: int) -> list[int]:
        """torchao 0.1 NF4Tensor.from_tensor(bf16, block 64, scaler block 256): the pieces it keeps."""
        nf4 = self.new(_NF4_TABLE)
        # double_quantize_scalers
        scalers = self.block_absmax(n, 64)
        mean = self.new(2)
        centred = self.new(2 * n // 64)
        self.drop(scalers)
        absmax = self.block_absmax(n // 64, 256)
        doubled = self.new(2 * n // 64)
        factor = self.new(2 * n // 64)  # 256 / (2 x expanded absmax): kept whole by the [:, 0] view
        self.drop(doubled)
        q = self.new(2 * n // 64)
        for _ in range(2):  # .round(), .clamp(): each a new tensor
            q2 = self.new(2 * n // 64)
            self.drop(q)
            q = q2
        qscalers = self.new(n // 64)  # .to(int8)
        self.drop(q, absmax, centred)
        # convert_to_norm_float_weight
        block_scalers = self.block_absmax(n, 64)
        scaled = self.new(2 * n)
        sub = self.new(32 * n)        # value.unsqueeze(-1) - nf4: (n, 16) bf16
        diff = self.new(32 * n)       # .abs()
        self.drop(sub)
        values, indices = self.new(2 * n), self.new(8 * n)  # diff.min(dim=-1)
        self.drop(values, diff)
        shifted = self.new(4 * n)     # quantized_blocks[::2] << 4 (int64)
        combined = self.new(4 * n)    # ... | quantized_blocks[1::2]
        self.drop(shifted)
        data = self.new(n // 2)       # .to(torch.uint8)
        self.drop(combined, scaled, indices, block_scalers)
        return [nf4, mean, factor, qscalers, data]

    def original_weight(self, n: int) -> int:
        """torchao 0.1 NF4Tensor.get_original_weight: the bf16 weight it returns (its locals freed)."""
        hi = self.new(n // 2)
        first = self.new(4 * n)       # (quantized_data >> 4).to(torch.long)
        self.drop(hi)
        lo = self.new(n // 2)
        second = self.new(4 * n)
        self.drop(lo)
        d1, d2 = self.new(n), self.new(n)  # nf4[index]
        t = self.new(2 * n // 64)
        scalers = self.new(2 * n // 64)
        self.drop(t)
        scaled = []
        for _ in range(2):
            repeated = self.new(n)    # repeated.flatten() of an expanded view: a copy
            scaled.append(self.new(n))
            self.drop(repeated)
        out = self.new(2 * n)         # torch.stack
        self.drop(first, second, d1, d2, scalers, *scaled)
        return out


def _layer_linears(model, cfg) -> list[tuple[int, bool]]:
    """(elements, quantised) of one decoder layer's linears in the builder's order."""
    adapted = set(cfg.targets)
    return [(l.in_features * l.out_features * l.count, l.name in adapted) for l in model.layer_linears() if l.is_linear]


def nf4_unchunked_load_reserved(model, cfg) -> int:
    """Bytes reserved after torchtune < 0.2.0 builds and loads ``model`` for QLoRA on one GPU (module
    docstring). Adapted linears are NF4 (``LoRALinear(quantize_base=True)``), the others bf16; the
    embedding, norms and output projection bf16; LoRA A/B in bf16 with the config's rank. The replay is
    the Llama-2 builder's order (attention, MLP, norms; embedding and head before the clones)."""
    linears = tuple(_layer_linears(model, cfg))
    head = 0 if model.tie_embeddings else model.vocab_size * model.hidden_size
    # each cloned layer's RotaryPositionalEmbeddings cache: [max_seq_len, head_dim // 2, 2] fp32
    rope = 4 * model.max_position_embeddings * model.head_dim
    return _replay(linears, model.num_layers, model.hidden_size, model.vocab_size * model.hidden_size, head,
                   cfg.rank, rope)


@lru_cache(maxsize=256)
def _replay(linears: tuple, layers: int, hidden: int, embed: int, head: int, rank: int, rope: int) -> int:
    r = _Replay()

    def build(n: int, nf4: bool, clone: bool = False) -> list[int]:
        if not nf4:
            return [r.new(2 * n)]
        # nn.Linear(...) on the GPU then to_nf4(linear.weight); a clone: Parameter.__deepcopy__ -> clone ->
        # to_nf4(get_original_weight()); the bf16 source is freed before lora_a / lora_b are made
        w = r.original_weight(n) if clone else r.new(2 * n)
        pieces = r.to_nf4(n)
        r.drop(w)
        return pieces + [r.new(2 * rank * hidden), r.new(2 * rank * max(1, n // hidden))]

    template = [build(n, q) for n, q in linears]
    extra = [r.new(rope), r.new(2 * hidden), r.new(2 * hidden)]  # the layer's RoPE cache and two RMSNorms
    keep = [r.new(2 * embed)] + ([r.new(2 * head)] if head else [])
    stack = []
    for _ in range(layers):
        stack.append([build(n, q, clone=True) for n, q in linears])
        keep += [r.new(rope), r.new(2 * hidden), r.new(2 * hidden)]
    keep.append(r.new(2 * hidden))  # the final norm
    r.drop(*[h for t in template for h in t], *extra)
    # load_state_dict: copy_ into each NF4 parameter = to_nf4(src.to(device)), old pieces replaced
    for layer in stack:
        for i, (n, q) in enumerate(linears):
            if not q:
                continue
            src = r.new(2 * n)
            pieces = r.to_nf4(n)
            r.drop(*layer[i][:5])
            layer[i] = pieces + layer[i][5:]
            r.drop(src)
    return r.a.reserved


# -- FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) ------------------------------------------------

#: ``torch/distributed/fsdp/_init_utils.py`` ``PARAM_BROADCAST_BUCKET_SIZE = int(250 * 1024 * 1024)``: the bucket
#: ``_sync_module_params_and_buffers`` hands to ``dist._broadcast_coalesced`` (torch 2.0 - 2.5)
FSDP1_BROADCAST_BUCKET = 250 * 1024 * 1024


def _buckets(sizes: tuple[int, ...], limit: int) -> list[int]:
    """``compute_bucket_assignment_by_size`` for one dtype: consecutive tensors, a bucket closes once it holds
    ``limit`` bytes or more (a tensor larger than the limit is a bucket of its own)."""
    out, cur = [], 0
    for s in sizes:
        cur += s
        if cur >= limit:
            out.append(cur)
            cur = 0
    if cur:
        out.append(cur)
    return out


@lru_cache(maxsize=256)
def fsdp1_wrap_reserved(before: tuple[int, ...], units: tuple[tuple[int, ...], ...], ranks: int,
                        sync_module_states: bool) -> int:
    """Bytes reserved on one rank once FSDP1 has wrapped a model, replayed through the caching allocator.

    ``before``: tensors already on the GPU when ``FullyShardedDataParallel(...)`` is called (bitsandbytes'
    quantisation constants, which are not parameters); ``units``: each FSDP unit's parameter sizes in bytes,
    in wrap order (``_recursive_wrap`` is post-order: nested units first, the root last). Per unit (torch 2.2
    ``_init_utils._init_param_handle_from_module``): the unit's parameters are materialised on the GPU
    (``param_init_fn`` / ``_move_module_to_device``); with ``sync_module_states`` ``_broadcast_coalesced``
    flattens them into :data:`FSDP1_BROADCAST_BUCKET` buckets one at a time; ``FlatParamHandle`` then
    ``torch.cat``s them into one flat parameter (``flatten_tensors``) and ``shard()`` clones this rank's chunk
    (``_get_shard``: padded to a multiple of ``ranks``) while the caller's ``managed_params`` still reference
    the originals; the flat tensor and the originals are freed when the call returns. Nothing empties the
    cache afterwards, so the freed blocks stay reserved. Returns the allocator's reserved bytes at the end.
    """
    a = CachingAllocator()
    for b in before:
        a.malloc(b)
    for unit in units:
        params = [a.malloc(p) for p in unit if p > 0]
        if sync_module_states:
            for b in _buckets(tuple(p for p in unit if p > 0), FSDP1_BROADCAST_BUCKET):
                a.free(a.malloc(b))
        total = sum(unit)
        flat = a.malloc(total)
        a.malloc(-(-total // ranks))  # this rank's shard, kept
        a.free(flat)
        for h in params:
            a.free(h)
    return a.reserved


@lru_cache(maxsize=256)
def fsdp1_unshard_pool(blocks: tuple[int, ...]) -> int:
    """Bytes the unshard stream's own pool reserves for the padded unsharded flat parameters alive at once.

    FSDP1 (``_runtime_utils._unshard``) all-gathers under ``state._unshard_stream``, so
    ``FlatParamHandle._alloc_padded_unsharded_flat_param`` allocates on that stream; the caching allocator
    keeps a freed block in the pool of the stream that allocated it, so these blocks never serve the compute
    stream's tensors and the compute stream's cached blocks (the wrap's) never serve them."""
    a = CachingAllocator()
    for b in blocks:
        if b > 0:
            a.malloc(b)
    return a.reserved
