"""Throughput: FLOPs and bytes of one training step by method, step time, tokens/s (numpy only).

Arrays broadcast: ``batch`` and ``seq`` may be numpy arrays, as in :mod:`vramplan.memory`, so
``vramplan fit`` times a whole grid of micro-batches at once.

**FLOPs** (matmul FLOPs, 2 per multiply-add). :func:`step_work` is the project's one counter
of a step's work: calibration fits a card's step-time model on it
(``vramplan.calibration.flops.step_shape`` repackages it), so the model applies unchanged:

* Training FLOPs per token ~ 6 N + 12 L H Q T (PaLM, Chowdhery et al. 2022, Appendix B; the
  MFU formula of nanoGPT and torchtitan): a forward is 2 FLOPs per weight touched (decoder
  linears, routed experts only for MoE, and the LM head) plus ``4 seq q_dim`` per layer for
  the attention scores and values (no causal discount); backward is twice the forward.
* Frozen weights skip the weight-gradient matmul: backward is one forward's matmuls for
  LoRA, QLoRA, DoRA and IA3 bases (the input gradient only), so a LoRA step is ~4 N per
  token, attention still twice (gradients of Q, K and V).
* Gradient checkpointing recomputes the forward: + 2 N per token (Korthikanti et al. 2023).
* LoRA's own matmuls, ``6 r (in + out)`` per adapted linear and token (forward, input and
  weight gradients), are counted apart (``adapter_flops``); DoRA also multiplies ``B A``
  (``2 r in out``) per forward to take the weight norm.
* DPO: chosen + rejected sequences (``sequences_per_example`` = 2) through the policy and
  a no-grad forward of the reference (the policy's base with the adapter disabled under PEFT).
* PPO (a method whose behaviour ``generates``): the rollout prefills the prompt (compute-bound) and generates
  ``generation(cfg).generated_tokens`` (PPO's ``ppo_response``)
  tokens one at a time (memory-bandwidth-bound: every token reads the policy's weights and
  the KV cache); then no-grad forwards of the reference, reward and value models and of the
  policy (old log-probs), and the clipped updates of policy and value (one PPO epoch).

**Time.** Compute runs at the card's dense tensor peak (``GPUSpec.tensor_tflops`` for the
compute dtype) x the card class's achievable-matmul fraction (MAMF, below) x a stack
efficiency for eager PyTorch training, reduced for narrow models and few tokens per
micro-step; memory-bound work (QLoRA's dequantisation, DoRA's weight norm, eager attention's
materialised scores, PPO's decoding, the optimiser update) runs at a fraction of the card's
bandwidth. A card with a calibration profile (``vramplan.profiles``) replaces the defaults by
its fitted step-time model or its measured achieved TFLOP/s, and every result says which it used.

Default efficiencies (assumptions; sources where measured):

* Achievable matmul fraction (ml-engineering, "Maximum Achievable Matmul FLOPS" table, BF16,
  REFERENCE.md): A100 SXM 271.2 / 312 TF = 0.869; A100 PCIe 252.9 / 312 = 0.811; H100 SXM
  794.5 / 989 = 0.803 (used for every Hopper card); B200 about 1745 / 2250 = 0.776 (used for
  datacenter Blackwell). GDDR workstation and consumer cards (Ampere 8.6, Ada, Blackwell
  12.0) have no published MAMF: 0.80 is assumed; Turing/Volta (fp16 only) 0.75.
* Stack efficiency 0.62 of MAMF at large micro-batches: eager transformers/PEFT training
  does not run at the matmul ceiling (norms, rotary, softmax and SwiGLU are memory-bound,
  kernels launch one by one). For scale: torchtune's Llama-3.2-3B full fine-tune on one
  A100, packed, without ``torch.compile``, 7,075 tokens/s (README, "Optimization flags") is
  53% MFU by the count above, 0.61 of MAMF (with the small-work factors below this model
  predicts 0.89x of it); torchtitan's compiled FSDP2 Llama-3-8B reaches 56-58% MFU on A100s
  (docs/performance.md). No published single-GPU HF Trainer figure was found; compiled
  stacks run 1.3-1.5x faster than predicted. ``benchmarks/throughput_vs_published.py``
  prints every comparison.
* Small work: ``x T / (T + 256)`` for T tokens per micro-step and ``x h / (h + 256)`` for
  hidden width h (narrow and short matmuls do not fill the GPU), and a floor of 0.25 ms per
  decoder layer per pass (about 30 kernel launches of ~8 us each in eager mode).
* Memory-bound work at 0.80 of the datasheet bandwidth. QLoRA dequantises every NF4 weight
  once per pass over the layers (forward, recompute, backward); effectively 8 bytes moved
  per weight and pass -- bitsandbytes/torchao dequantise in several memory-bound passes.
  ``benchmarks/qlora_overhead.py`` solves each published same-shape LoRA/QLoRA pair for
  this figure: litgpt's config hub on an A10G (Mistral-7B, QLoRA 31% fewer tokens/s: 9.8;
  Phi-3-mini, 13.5% fewer: 6.5), LLaMA-Factory's Llama-2-7B on an A100 (no gap: 0); median of
  the bitsandbytes pairs 6.5, so 8 errs on the slow side (a test keeps it between the median
  and twice it). The cost is per micro-step, not per token: at 1-2k tokens per micro-step
  it is the 15-30% the published runs show, at fit's larger micro-batches a few percent.
  torchtune's compiled torchao pair (Llama-3.1-8B, RTX 4090: 2,413 vs 3,083 tokens/s) implies
  more (~30) because this model's eager compute is slower than compiled torchtune's.
  DoRA (PEFT ``DoraLinearLayer``) materialises ``W + s B A`` in fp32 per forward for its
  column norm: ~18 bytes per adapted weight. Eager attention writes and reads the fp32
  scores, the softmax and its 16-bit cast: ~20 bytes per score in forward, ~40 in backward.
* The optimiser update streams parameters, gradients and states once: fused AdamW reads
  p, g, m, v and writes p, m, v (28 bytes per fp32 parameter); bitsandbytes' 8-bit AdamW
  moves 16 bytes but at 0.4 of the bandwidth (torchtune measured 4.7% fewer tokens/s
  with 8-bit AdamW on a 3B full fine-tune); a foreach (non-fused) AdamW 1.5x the bytes.
* PPO decoding: per generated token, ``max(bytes / bandwidth, FLOPs / compute)`` plus
  0.3 ms per decoder layer of launch overhead (HF ``generate`` in eager mode is
  CPU-bound at small batches); bitsandbytes 4-bit weights are dequantised for every token
  when more than one sequence is decoded (4.5 bytes per weight instead of 0.5).

Memory-saving techniques of the training stack (``--techniques``, ``vramplan/data/stacks.toml``)
add their ``cost``, a fraction of the micro-step time sourced there (torchtune's and torchao's
published ablations): activation offloading 1% with gradient checkpointing (25% assumed
without), selective checkpointing 13% (0 under full checkpointing), optimiser CPU offload
20%; chunked or fused cross-entropy and the optimiser step in backward 0.

Known limitations: no torch.compile, Liger or Unsloth kernels (they run faster than this
model says); sequences are packed or equal length (padding costs tokens that do not count);
PPO runs one epoch of updates per rollout (TRL's ``num_ppo_epochs`` multiplies the update part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import TrainConfig, fields_but
from .distributed import SINGLE, Comm, Parallel, comm_volume, overlap
from .gpus import GPUSpec, card_class
from .memory import model_state
from .methods import LOW_RANK, Adapter, Forward
from .methods.generation import generation_work
from .models import ModelSpec
from .optimizers import get_optimizer
from .precision import DTYPE_BYTES
from .stacks import techniques
from .taxonomy import Component

# -- default efficiencies (see the module docstring for sources) ---------------------------

#: Measured MAMF / datasheet peak (ml-engineering, BF16 table) for the cards that have one.
MAMF_BY_CARD = {
    "a100-40gb": (0.869, "ml-engineering MAMF: A100 SXM 271.2 of 312 TF"),
    "a100-80gb": (0.869, "ml-engineering MAMF: A100 SXM 271.2 of 312 TF"),
    "a100-80gb-pcie": (0.811, "ml-engineering MAMF: A100 PCIe 252.9 of 312 TF"),
    "h100-sxm": (0.803, "ml-engineering MAMF: H100 SXM 794.5 of 989 TF"),
}
#: Per card class when the card itself has no measurement.
MAMF_BY_CLASS = {
    "datacenter-hopper": (0.803, "ml-engineering MAMF of the H100 SXM (794.5 of 989 TF) applied to every Hopper card"),
    "datacenter-blackwell": (0.776, "ml-engineering: B200 SXM about 1745 of 2250 TF"),
    "datacenter-ampere": (0.869, "ml-engineering MAMF: A100 SXM 271.2 of 312 TF"),
    "gddr": (0.80, "assumed: no published MAMF for GDDR workstation/consumer cards (datacenter range 0.78-0.87)"),
    "pre-ampere": (0.75, "assumed: Turing/Volta fp16 tensor cores, no published MAMF"),
    "generic": (0.80, "assumed for a --gpu-mem placeholder card"),
}
STACK_EFFICIENCY = 0.62   # eager PyTorch/transformers training, of MAMF (module docstring)
TOKENS_HALF = 256.0       # tokens per micro-step at which small-work efficiency halves
WIDTH_HALF = 256.0        # hidden width at which narrow-matmul efficiency halves
BANDWIDTH_EFFICIENCY = 0.80
LAUNCH_S_PER_LAYER_PASS = 0.25e-3
DECODE_LAUNCH_S_PER_LAYER = 0.30e-3
DEQUANT_BYTES_PER_PARAM = 8.0   # effective bytes moved per NF4 weight per pass (module docstring)
DORA_BYTES_PER_PARAM = 18.0
EAGER_FWD_BYTES, EAGER_BWD_BYTES = 20.0, 40.0  # per attention score element


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of a card's datasheet figures that the default time model uses."""

    card_class: str
    matmul: float          # achievable matmul fraction (MAMF / peak)
    matmul_source: str
    stack: float = STACK_EFFICIENCY
    bandwidth: float = BANDWIDTH_EFFICIENCY


def card_efficiency(gpu: GPUSpec) -> Efficiency:
    """The default efficiencies of ``gpu``: its own MAMF measurement, else its class's."""
    cls = card_class(gpu).name
    base = gpu.name.split("@", 1)[0]  # a --gpu-mem override keeps its card's throughput
    frac, src = MAMF_BY_CARD.get(base, MAMF_BY_CLASS[cls])
    return Efficiency(cls, frac, src)


# -- work of one micro-step ----------------------------------------------------------------

@dataclass
class StepWork:
    """FLOPs, bytes and passes of one micro-step on one GPU (arrays over batch/seq)."""

    tokens: np.ndarray            # tokens through the trained policy: batch x seq x sequences per example
    batch: np.ndarray             # sequences per micro-step (examples)
    model_flops: np.ndarray       # calibration convention (includes the rollout's generation FLOPs)
    adapter_flops: np.ndarray     # LoRA/DoRA matmuls, not in model_flops
    rollout_flops: np.ndarray     # the part of model_flops spent generating (PPO prefill + decode)
    prefill_flops: np.ndarray     # PPO prompt prefill (compute-bound)
    prefill_tokens: np.ndarray
    decode_bytes: np.ndarray      # bytes read by all decode steps (weights + KV cache)
    decode_flops: np.ndarray
    eager_bytes: np.ndarray       # eager attention score traffic
    layer_passes: int             # sequential passes over the layers (forward, backward, recompute, no-grad)
    gen_tokens: int               # tokens generated one at a time (PPO)
    layers: int
    hidden: int
    dequant_gparams: float        # NF4 weights dequantised per micro-step in 1e9 (calibration convention)
    train_dequant_gparams: float  # the part outside generation
    dora_params: float            # adapted weights whose norm DoRA recomputes, x forwards


def _body_params(spec: ModelSpec) -> int:
    """Matmul weights touched per token in the decoder layers (routed experts only for MoE)."""
    return (spec.active_params - spec.embedding_params - spec.lm_head_params
            - spec.num_layers * spec.layer_norm_params() - spec.final_norm_params)


def _adapted_shapes(spec: ModelSpec, cfg: TrainConfig) -> list[tuple[int, int, int]]:
    """(in, out, matrices in the model) of every LoRA/DoRA-adapted linear."""
    if not cfg.recipe.adapter.low_rank:
        return []
    lin = {l.name: l for l in spec.layer_linears() if l.is_linear}
    return [(lin[t].in_features, lin[t].out_features, lin[t].count * spec.num_layers) for t in cfg.targets if t in lin]


#: :func:`_adapted_sums` by (spec, targets) (cleared when it grows past 4096 entries)
_SUMS: dict = {}


def _adapted_sums(spec: ModelSpec, cfg: TrainConfig) -> tuple[int, int] | None:
    """``(sum of (in + out) x matrices, sum of in x out x matrices)`` over :func:`_adapted_shapes` (integers), None
    when nothing is adapted: what :func:`_adapter_work` multiplies by the rank. Kept per (spec, targets), all they
    read once the adapter is low-rank: a search asks for every candidate's (tests/test_core8_speed.py)."""
    if not cfg.recipe.adapter.low_rank:
        return None
    key = (spec, cfg.targets)
    try:
        got = _SUMS.get(key, False)
    except TypeError:  # a spec built with list fields (from a log's JSON): nothing kept
        return _sums_of(_adapted_shapes(spec, cfg))
    if got is False:
        if len(_SUMS) > 4096:
            _SUMS.clear()
        got = _SUMS[key] = _sums_of(_adapted_shapes(spec, cfg))
    return got


def _sums_of(shapes: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    return (sum((i + o) * n for i, o, n in shapes), sum(i * o * n for i, o, n in shapes)) if shapes else None


def step_work(spec: ModelSpec, cfg: TrainConfig, batch=None, seq=None) -> StepWork:
    """What one micro-step of ``cfg`` does on ``spec`` (arrays broadcast over ``batch`` and ``seq``):
    the passes of the model copies (:func:`_pass_work`), the rollout of a method that generates
    (:func:`_rollout_work`) and the adapters' own matmuls (:func:`_adapter_work`)."""
    return _step_work(spec, cfg, batch, seq)


#: the fields :func:`_pass_work` does not read: a low-rank adapter's shape (rank, alpha, targets), its dropout and the
#: optimiser (it reads the recipe, checkpointing, the attention, the sequence and the tokens)
_NOT_IN_PASSES = ("optimizer", "rank", "alpha", "targets", "dropout")


def _step_work(spec: ModelSpec, cfg: TrainConfig, batch=None, seq=None, passes: dict | None = None,
               adapted: tuple | None = None) -> StepWork:
    """:func:`step_work`; ``passes``: a dict the caller keeps over one ``batch``/``seq`` grid, of each configuration's
    :func:`_pass_work` by its fields but :data:`_NOT_IN_PASSES` (the candidates of a search at every rank and
    targets share them; each step work gets its own copy, which the rollout adds to); ``adapted``: the low-rank
    adapters of several configurations equal to ``cfg`` but in their rank and targets (:func:`_adapted_rows`): the
    work's adapter FLOPs and DoRA's parameters are then one row each (the rest, which neither reads, is ``cfg``'s)."""
    recipe = cfg.recipe
    b = np.asarray(cfg.batch if batch is None else batch, dtype=np.float64)
    s = np.asarray(cfg.seq if seq is None else seq, dtype=np.float64)
    zeros = np.zeros(np.broadcast(b, s).shape)
    tokens = b * s * recipe.sequences_per_example + zeros
    if passes is None:
        p = _pass_work(spec, cfg, tokens, s, zeros)
    else:
        key = fields_but(cfg, *_NOT_IN_PASSES)
        kept = passes.get(key)
        if kept is None:
            kept = passes[key] = _pass_work(spec, cfg, tokens, s, zeros)
        p = _Passes(flops=kept.flops, eager=kept.eager, passes=kept.passes, dequant=kept.dequant)
    train_dequant = p.dequant
    r = _rollout_work(spec, cfg, b, s, zeros) if recipe.behaviour.generates else None
    if r is not None:
        p.passes += r.passes
        if recipe.adapter.quantized_base:
            p.dequant += spec.linear_params / 1e9 * r.dequant_passes
    adapter, dora = _adapter_work(spec, cfg, tokens, zeros, adapted)
    rollout = zeros.copy() if r is None else r.scoring_flops + zeros
    return StepWork(tokens=tokens, batch=b + zeros, model_flops=p.flops + rollout, adapter_flops=adapter,
                    rollout_flops=rollout,
                    prefill_flops=zeros.copy() if r is None else r.prefill_flops + zeros,
                    prefill_tokens=zeros.copy() if r is None else r.prefill_tokens + zeros,
                    decode_bytes=zeros.copy() if r is None else r.decode_bytes + zeros,
                    decode_flops=zeros.copy() if r is None else r.decode_flops + zeros,
                    eager_bytes=p.eager, layer_passes=p.passes, gen_tokens=0 if r is None else r.generated_tokens,
                    layers=spec.num_layers, hidden=spec.hidden_size, dequant_gparams=p.dequant,
                    train_dequant_gparams=train_dequant, dora_params=dora)


@dataclass
class _Passes:
    """The passes of a step's model copies over its tokens: matmul FLOPs, eager attention's score bytes,
    sequential passes over the layers and NF4 weights dequantised (1e9)."""

    flops: np.ndarray
    eager: np.ndarray
    passes: int = 0
    dequant: float = 0.0

    def forward(self, n, fwd, tokens, score, quant_linear: float) -> None:
        """``n`` no-grad forwards of ``fwd`` FLOPs (a frozen copy, a scoring or an extra forward); ``score``: score
        elements per token, None without eager attention (no score traffic: adding its zeros changes nothing, nor
        does adding no forward at all)."""
        if not n:
            return
        self.flops = self.flops + n * fwd
        self.passes += n
        if score is not None:
            self.eager = self.eager + n * tokens * score * EAGER_FWD_BYTES
        self.dequant += n * quant_linear


def _pass_work(spec: ModelSpec, cfg: TrainConfig, tokens, s, zeros) -> _Passes:
    """Every forward and backward of the recipe's copies (and the roles sharing the policy's weights).

    A copy's forward is ``2 (body + head)`` FLOPs per token plus ``4 seq q_dim`` per layer for
    attention; a trained copy's backward is twice the forward's matmuls when it trains fully (else
    once: the input gradient only) and twice its attention, and gradient checkpointing recomputes the
    forward. A method that generates scores with a no-grad forward of its training copies; the
    method's extra no-grad forwards (KTO's KL estimate) come from ``Behaviour.extra_forwards``.
    """
    recipe = cfg.recipe
    body, h, L = _body_params(spec), spec.hidden_size, spec.num_layers
    attn_fwd = 4 * s * spec.q_dim * L  # per token
    gc = 1 if cfg.grad_ckpt else 0
    quant_linear = spec.linear_params / 1e9
    # score elements per token (eager attention's traffic; None: no such traffic, the eager bytes stay zeros)
    score = s * spec.num_heads * L if cfg.attention.materialises_scores else None
    extra = dict(recipe.behaviour.extra_forwards)
    w = _Passes(flops=zeros.copy(), eager=zeros.copy())
    for c in recipe.copies:
        head = spec.vocab_size * h if c.head == "lm" else h
        fwd_mm = 2 * (body + head)
        fwd = (fwd_mm + attn_fwd) * tokens
        q = quant_linear if c.quantized else 0.0
        if c.forward is Forward.GRAD:
            bwd = ((2 * fwd_mm if c.adapter is Adapter.FULL else fwd_mm) + 2 * attn_fwd) * tokens
            w.flops = w.flops + (fwd * (1 + gc) + bwd)
            w.passes += 2 + gc
            if score is not None:
                w.eager = w.eager + tokens * score * (EAGER_FWD_BYTES * (1 + gc) + EAGER_BWD_BYTES)
            w.dequant += q * (2 + gc)
            if recipe.behaviour.generates:  # no-grad scoring forward of a training copy
                w.forward(1, fwd, tokens, score, q)
        elif c.forward is Forward.NO_GRAD:
            w.forward(1, fwd, tokens, score, q)
        w.forward(extra.get(c.role.value, 0), fwd, tokens, score, quant_linear * c.quantized)
    shared_q = quant_linear if recipe.adapter.quantized_base else 0.0
    for role in recipe.shared_roles:  # the policy's weights in another role (PEFT's adapter-disabled reference)
        n = 1 + extra.get(role.value, 0)
        w.flops = w.flops + n * (2 * (body + spec.vocab_size * h) + attn_fwd) * tokens
        w.passes += n
        if score is not None:
            w.eager = w.eager + n * tokens * score * EAGER_FWD_BYTES
        w.dequant += n * shared_q
    return w


def _rollout_work(spec: ModelSpec, cfg: TrainConfig, b, s, zeros):
    """The rollout's work (:func:`vramplan.methods.generation.generation_work`): the prompt's prefill,
    the decoding of every generated token and the scoring forwards, as the method's generation says."""
    recipe = cfg.recipe
    fwd_mm = 2 * (_body_params(spec) + spec.vocab_size * spec.hidden_size)
    return generation_work(spec, cfg.regime, recipe.copies[0], recipe.behaviour.generation(cfg), b, s, fwd_mm)


def _adapter_work(spec: ModelSpec, cfg: TrainConfig, tokens, zeros, adapted: tuple | None = None):
    """``(adapter FLOPs, DoRA's weight-norm parameters)`` of one micro-step: LoRA's own matmuls,
    ``6 r (in + out)`` per adapted linear and token for each trained low-rank copy (forward, input and
    weight gradients; ``2 r (in + out)`` more per recomputed forward), ``2 r (in + out)`` for a
    generating method's scoring forward; DoRA multiplies ``B A`` (``2 r in out``) per forward to take
    the weight norm and reads every adapted weight for it.

    ``adapted``: ``(ranks, edges, areas)``, int64 columns (:func:`_adapted_rows`) of configurations equal to
    ``cfg`` but in their rank and targets: the FLOPs are then one row per configuration (the integer products
    exact in int64, as in Python's ints; each element sees the same operations in the same order as one
    configuration's scalars) and DoRA's parameters a float64 column."""
    recipe = cfg.recipe
    adapter = zeros.copy()
    if adapted is None:
        sums = _adapted_sums(spec, cfg)
        if sums is None:
            return adapter, 0.0
        rank, (edges, areas) = cfg.rank, sums  # (integers: each sum over the shapes times the rank is the rank
        # times the sum, exactly)
    else:
        rank, edges, areas = adapted
    gc = 1 if cfg.grad_ckpt else 0
    lora_per_token = 6 * rank * edges
    fwd_per_token = 2 * rank * edges
    grad_copies = [c for c in recipe.copies if c.forward is Forward.GRAD and c.adapter in LOW_RANK]
    forwards = 1 + gc + (1 if recipe.behaviour.generates else 0)
    adapter = adapter + len(grad_copies) * tokens * (lora_per_token + gc * fwd_per_token)
    if recipe.behaviour.generates:
        adapter = adapter + tokens * fwd_per_token
    dora = 0.0
    if recipe.adapter.dora:
        dora = float(areas * forwards) if adapted is None else (areas * forwards).astype(np.float64)
        adapter = adapter + 2 * rank * areas * forwards
    return adapter, dora


def _adapted_rows(spec: ModelSpec, cfgs: list[TrainConfig]) -> tuple | None:
    """``(ranks, edges, areas)`` of ``cfgs`` (low-rank configurations of one recipe), int64 columns: each one's rank
    and :func:`_adapted_sums`, what :func:`_adapter_work` reads of it; None when they adapt nothing, or a sum is
    beyond int64 (each is then worked out on its own)."""
    sums = [_adapted_sums(spec, c) for c in cfgs]
    if any(s is None for s in sums):
        return None
    rows = [(c.rank, e, ar) for c, (e, ar) in zip(cfgs, sums)]
    if 6 * 3 * max(r for r, _, _ in rows) * max(max(e, ar) for _, e, ar in rows) >= 2 ** 62:
        return None  # (what _adapter_work multiplies, at most 6 x rank x sum x 3 forwards, stays inside int64)
    cols = np.array(rows, dtype=np.int64).T.reshape(3, -1, 1)
    return cols[0], cols[1], cols[2]


def flops_per_token(spec: ModelSpec, cfg: TrainConfig, seq=None) -> np.ndarray:
    """Training FLOPs per token of ``cfg`` (model + adapter matmuls, one micro-step / its tokens)."""
    w = step_work(spec, cfg, batch=1, seq=seq)
    return (w.model_flops + w.adapter_flops) / w.tokens


# -- time ----------------------------------------------------------------------------------

@dataclass
class StepTime:
    """Seconds of one optimiser step and the throughput that follows (arrays over batch/seq).

    ``tokens_per_s`` counts the tokens of all GPUs (batch x seq x sequences per example x
    grad_accum x GPUs per step). ``achieved_tflops`` and ``mfu`` are per GPU and count the
    FLOPs as :func:`step_work` does: the recompute of gradient checkpointing included (so
    ``mfu`` is a hardware-FLOPs utilisation), LoRA's own matmuls left out.
    """

    step_s: np.ndarray
    micro_s: np.ndarray
    optimizer_s: float
    comm_s: float
    host_s: float
    tokens_per_step: np.ndarray
    tokens_per_s: np.ndarray
    achieved_tflops: np.ndarray
    mfu: np.ndarray
    grad_accum: np.ndarray
    calibrated: bool
    source: str
    parts: dict = field(default_factory=dict)

    def _picker(self, index):
        """``v -> float(v at index)``: a field (or part) broadcast to the grid of ``step_s`` as float64, at ``index``."""
        shape = np.shape(self.step_s)

        def pick(v) -> float:
            if type(v) is float:
                return v
            if type(v) is np.ndarray and v.dtype == np.float64 and v.shape == shape:
                return float(v[index])  # np.asarray and np.broadcast_to would give this array itself
            a = np.asarray(v, dtype=np.float64)
            if a.ndim == 0:
                return float(a)
            return float((a if a.shape == shape else np.broadcast_to(a, shape))[index])
        return pick

    def at(self, index=()) -> "StepTime":
        """The scalar StepTime at ``index`` of the grid (``()`` for an already scalar one)."""
        pick = self._picker(index)
        scalars = {k: pick(getattr(self, k)) for k in ("step_s", "micro_s", "optimizer_s", "comm_s", "host_s",
                                                          "tokens_per_step", "tokens_per_s", "achieved_tflops", "mfu")}
        return StepTime(**scalars, grad_accum=int(round(pick(self.grad_accum))), calibrated=self.calibrated,
                        source=self.source, parts={k: pick(v) for k, v in self.parts.items()})

    def json_at(self, index=()) -> dict:
        """The JSON of the scalar StepTime at ``index`` (``self.at(index).to_json()``), without building it (a fit's
        JSON writes one per plan listed): every value rounded for JSON; ``to_json`` is this at ``()``."""
        pick = self._picker(index)
        return {"step_time_s": round(pick(self.step_s), 6), "micro_step_s": round(pick(self.micro_s), 6),
                "optimizer_s": round(pick(self.optimizer_s), 6), "comm_s": round(pick(self.comm_s), 6),
                "host_s": round(pick(self.host_s), 6), "tokens_per_step": int(round(pick(self.tokens_per_step))),
                "tokens_per_s": round(pick(self.tokens_per_s), 1), "achieved_tflops": round(pick(self.achieved_tflops), 2),
                "mfu": round(pick(self.mfu), 4), "grad_accum": int(round(pick(self.grad_accum))),
                "calibrated": self.calibrated, "source": self.source,
                "parts_s": {k: round(pick(v), 6) for k, v in self.parts.items()}}

    def to_json(self) -> dict:
        """A scalar StepTime's JSON (:meth:`json_at`, the one layout)."""
        return self.json_at()


_LOAD = object()  # StepTimeInputs(profile=...) default: look the card's profile up


def _profile(gpu: GPUSpec):
    if gpu is None or gpu.custom:
        return None
    try:
        from .profiles import load_profile
    except ImportError:  # pragma: no cover - the profiles module is optional
        return None
    return load_profile(gpu.name)


def _optimizer_seconds(spec: ModelSpec, cfg: TrainConfig, gpu: GPUSpec, par: Parallel, st=None) -> float:
    """The optimiser update: trainable parameters x bytes streamed, at the optimiser's bandwidth share."""
    if par.offload == "cpu":
        return 0.0  # runs on the CPU: Comm.seconds counts it
    st = st or model_state(spec, cfg)
    P = st.trainable_params
    if P == 0:
        return 0.0
    opt = get_optimizer(cfg.optimizer)
    regime = cfg.regime
    if par.strategy is not None and par.sharding.deepspeed_stage:
        pb = 4  # DeepSpeed steps the fp32 master partition
    else:
        pb = max(1, round(st.bytes.get(Component.GRADIENTS, 0) / P))
    # bytes streamed per parameter and the bandwidth share: optimizers.toml (foreach AdamW: extra temporaries)
    per = opt.update_bytes_per_param(pb, loop=not regime.training_loop.fused_optimizer and par.strategy is None)
    shard = par.gpus if par.shards_states else 1
    bw = gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY * opt.bandwidth_efficiency
    return P / shard * per / bw


@dataclass(frozen=True)
class StepTimeInputs:
    """:func:`step_time`'s optional inputs: whether the card's calibration profile is used, and what
    a caller already has (a search passes them once for many candidates)."""

    use_profile: bool = True  #: False ignores the card's calibration profile (the defaults only)
    profile: Any = _LOAD      #: an already loaded profile (or None) to skip the lookup
    state: Any = None         #: ``model_state(spec, cfg)`` (a :class:`vramplan.memory.ModelState`)
    sharded: Any = None       #: ``shard_state(...)`` (a :class:`vramplan.distributed.ShardedState`)


#: the defaults: look the card's profile up, compute the model state
DEFAULT_INPUTS = StepTimeInputs()
#: the default efficiencies only (benchmarks comparing against them)
NO_PROFILE = StepTimeInputs(use_profile=False)


def step_time(spec: ModelSpec, cfg: TrainConfig, gpu: GPUSpec, batch=None, seq=None, *, grad_accum: int | None = None,
              parallel: Parallel = SINGLE, inputs: StepTimeInputs = DEFAULT_INPUTS) -> StepTime:
    """Seconds per optimiser step and tokens/s of ``cfg`` on ``gpu`` (arrays over ``batch``/``seq``).

    Args:
        spec, cfg: the model and the validated configuration (shapes per micro-batch and GPU).
        gpu: the card; its calibration profile is used when one ships (``inputs.use_profile``).
        batch, seq: override the config's micro-batch / sequence (numpy arrays broadcast).
        grad_accum: micro-steps per optimiser step (default ``cfg.grad_accum``; may be an array).
        parallel: GPUs and sharding strategy (communication and the sharded optimiser).
        inputs: :class:`StepTimeInputs` -- :data:`NO_PROFILE` for the defaults only; a loaded profile,
            the model state and the sharded state when the caller has them.

    Returns:
        :class:`StepTime`; ``source`` names the profile or the default efficiencies used.
    """
    return _step_time(spec, cfg, gpu, batch, seq, grad_accum=grad_accum, parallel=parallel, inputs=inputs)


def step_time_rows(spec: ModelSpec, cfgs: list[TrainConfig], gpu: GPUSpec, batch=None, *, grad_accum=None,
                   parallel: Parallel = SINGLE, inputs: list[StepTimeInputs] | None = None) -> list[StepTime]:
    """:func:`step_time` of each of ``cfgs`` over the same ``batch``/``grad_accum`` grid, equal to it.

    The work of a step (:func:`step_work`) does not depend on the optimiser: it is counted once
    per configuration that differs in more than its optimiser. On one GPU without a calibration profile (a grid
    of micro-batches), the configurations equal but in their optimiser, rank and targets are timed together
    (:func:`_group_times`). ``inputs``: each config's :class:`StepTimeInputs` (None: the defaults for all).
    """
    if grad_accum is not None:  # float64 once (what _step_time makes of it), not once per configuration
        grad_accum = np.asarray(grad_accum, dtype=np.float64)
    eff = card_efficiency(gpu)  # the card's, for every configuration
    inputs = [DEFAULT_INPUTS] * len(cfgs) if inputs is None else inputs
    if not parallel.distributed and np.ndim(batch) == 1 and np.ndim(grad_accum) <= 1 and not _any_profile(gpu, inputs):
        groups: dict = {}  # configuration but _NOT_IN_GROUP -> the indices of its configurations
        for i, cfg in enumerate(cfgs):
            groups.setdefault(fields_but(cfg, *_NOT_IN_GROUP), []).append(i)
        out: list = [None] * len(cfgs)
        passes: dict = {}
        for rows in groups.values():
            times = _group_times(spec, [cfgs[i] for i in rows], gpu, batch, grad_accum, parallel,
                                 [inputs[i] for i in rows], eff, passes)
            for i, t in zip(rows, times):
                out[i] = t
        return out
    works: dict = {}
    passes = {}  # the model copies' passes (_pass_work), shared by the configurations of every rank and targets
    micros: dict = {}  # the micro-step's seconds by the same key, without a profile (_step_time)
    out = []
    for i, cfg in enumerate(cfgs):
        k = fields_but(cfg, "optimizer")
        if k not in works:
            works[k] = _step_work(spec, cfg, batch, passes=passes)
        out.append(_step_time(spec, cfg, gpu, batch, grad_accum=grad_accum, parallel=parallel, inputs=inputs[i],
                              work=works[k], kept=(micros, k), eff=eff))
    return out


#: the fields that enter a step's time only through the adapter's FLOPs, DoRA's norm (rank and targets) and the
#: optimiser's seconds, or not at all (alpha): :func:`step_time_rows` times the configurations equal but in these
#: together
_NOT_IN_GROUP = ("optimizer", "rank", "alpha", "targets")


def _any_profile(gpu: GPUSpec, inputs: list[StepTimeInputs]) -> bool:
    """Whether any of ``inputs`` times with a calibration profile (:func:`_step_time`'s ``prof`` not None)."""
    loaded = _LOAD
    for x in inputs:
        if not x.use_profile:
            continue
        if x.profile is not _LOAD:
            if x.profile is not None:
                return True
            continue
        if loaded is _LOAD:
            loaded = _profile(gpu)
        if loaded is not None:
            return True
    return False


def _group_times(spec: ModelSpec, cfgs: list[TrainConfig], gpu: GPUSpec, batch, grad_accum, parallel: Parallel,
                 inputs: list[StepTimeInputs], eff: Efficiency, passes: dict) -> list[StepTime]:
    """:func:`_step_time` of configurations ``cfgs`` equal but in :data:`_NOT_IN_GROUP`, on one GPU without a
    calibration profile (``batch`` a grid): their work is one :func:`_step_work` whose adapter FLOPs and DoRA
    parameters have one row per configuration but its optimiser (:func:`_adapted_rows`); the micro-step's
    seconds (:func:`_default_micro`) and what the optimiser does not enter (:func:`_optimizer_free`) are worked
    out once on those rows -- elementwise, each row sees its own configuration's operations in their order;
    the optimiser's seconds are a column over the configurations (:func:`_step_arrays`). Each StepTime's arrays
    are rows of these, equal to :func:`step_time`'s (tests/test_time11_speed.py)."""
    row_of: dict = {}  # configuration but its optimiser -> its row
    reps: list[TrainConfig] = []
    which = []
    for cfg in cfgs:
        j = row_of.setdefault(fields_but(cfg, "optimizer"), len(row_of))
        if j == len(reps):
            reps.append(cfg)
        which.append(j)
    cfg = reps[0]
    adapted = _adapted_rows(spec, reps) if cfg.recipe.adapter.low_rank else None
    if adapted is None and len(reps) > 1 and cfg.recipe.adapter.low_rank:  # a sum beyond int64: one at a time
        return [t for c, x in zip(cfgs, inputs) for t in _group_times(spec, [c], gpu, batch, grad_accum, parallel,
                                                                      [x], eff, passes)]
    # (no low-rank adapter: the configurations' works are equal, the first one's stands for all)
    w = _step_work(spec, cfg, batch, passes=passes, adapted=adapted)
    a = np.asarray(cfg.grad_accum if grad_accum is None else grad_accum, dtype=np.float64)
    peak = gpu.tensor_tflops(cfg.regime.compute_dtype) * 1e12
    micro, parts, net_s, host_s, overlapped, tokens_step, flops = _optimizer_free(
        cfg, *_default_micro(spec, gpu, w, None, eff, peak), a, w, parallel, None, None, spec, gpu)
    opt = [_optimizer_seconds(spec, c, gpu, parallel, x.state or model_state(spec, c)) for c, x in zip(cfgs, inputs)]
    rows = np.array(which, dtype=np.intp)
    two_d = adapted is not None  # (over a one-dimensional grid, the rows' arrays are two-dimensional)
    step, tps, ach, mfu, (opt_part, comm_part, host_part) = _step_arrays(
        overlapped[rows] if two_d else overlapped, np.array(opt, dtype=np.float64).reshape(-1, 1), net_s, host_s,
        tokens_step, flops, peak)
    if two_d:  # each row's parts and micro-step seconds, taken once (a part the rows share stays whole)
        own = [({k: (v[j] if v.ndim == 2 else v) for k, v in parts.items()}, micro[j]) for j in range(len(reps))]
    else:
        own = [(parts, micro)] * len(reps)
    sources = {u: _default_source(eff, u) for u in {x.use_profile for x in inputs}}
    out = []
    for j, x, o, s, t, ac, m, op, cp, hp in zip(which, inputs, opt, step, tps, ach, mfu, opt_part, comm_part,
                                               host_part):
        out.append(StepTime(step_s=s, micro_s=own[j][1], optimizer_s=o, comm_s=net_s, host_s=host_s,
                            tokens_per_step=tokens_step, tokens_per_s=t, achieved_tflops=ac, mfu=m, grad_accum=a,
                            calibrated=False, source=sources[x.use_profile],
                            parts={**own[j][0], "optimizer_s": op, "comm_s": cp, "host_s": hp}))
    return out


def _step_time(spec: ModelSpec, cfg: TrainConfig, gpu: GPUSpec, batch=None, seq=None, *, grad_accum=None,
               parallel: Parallel = SINGLE, inputs: StepTimeInputs = DEFAULT_INPUTS,
               work: StepWork | None = None, kept: tuple[dict, Any] | None = None,
               eff: Efficiency | None = None) -> StepTime:
    """:func:`step_time`; ``work``: ``step_work(spec, cfg, batch, seq)`` when the caller has it; ``kept``: a dict
    and ``cfg``'s key in it (the config but its optimiser, whose work ``work`` is): without a calibration profile
    the micro-step's seconds (:func:`_default_micro`) read the work, the card and the regime, not the optimiser,
    so the configurations of one key share them (:func:`step_time_rows`); ``eff``: ``card_efficiency(gpu)`` when the
    caller has it."""
    use_profile, profile, state, sharded = inputs.use_profile, inputs.profile, inputs.state, inputs.sharded
    a = np.asarray(cfg.grad_accum if grad_accum is None else grad_accum, dtype=np.float64)
    w = step_work(spec, cfg, batch, seq) if work is None else work
    eff = card_efficiency(gpu) if eff is None else eff
    peak = gpu.tensor_tflops(cfg.regime.compute_dtype) * 1e12
    st = state or model_state(spec, cfg)
    opt_s = _optimizer_seconds(spec, cfg, gpu, parallel, st)
    prof = None if not use_profile else (_profile(gpu) if profile is _LOAD else profile)
    key = cfg.recipe.name
    micro = None
    source = _default_source(eff, use_profile)
    calibrated = False
    parts: dict[str, np.ndarray] = {}
    if prof is not None:
        micro = _profile_micro(prof, key, w, opt_s, cfg.framework)
        if micro is not None:
            calibrated = True
            source = f"calibration profile {getattr(prof, 'path', None) or gpu.name} (throughput:{key})"
            parts["profile_s"] = micro
    if micro is None and (kept is None or prof is not None):
        micro, parts = _default_micro(spec, gpu, w, prof, eff, peak)
    elif micro is None:
        if kept[1] not in kept[0]:
            kept[0][kept[1]] = _default_micro(spec, gpu, w, prof, eff, peak)
        if not parallel.distributed:
            # one GPU: everything but the optimiser's seconds reads the key's work and micro-step (and the
            # request's accumulation grid), so the configurations of one key share it too
            shared = ("optimizer-free", kept[1])
            if shared not in kept[0]:
                kept[0][shared] = _optimizer_free(cfg, *kept[0][kept[1]], a, w, parallel, sharded, st, spec, gpu)
            return _with_optimizer(*kept[0][shared], a, opt_s, peak, calibrated, source)
        micro, parts = kept[0][kept[1]]
    return _with_optimizer(*_optimizer_free(cfg, micro, parts, a, w, parallel, sharded, st, spec, gpu), a, opt_s, peak,
                           calibrated, source)


def _optimizer_free(cfg: TrainConfig, micro, parts: dict, a, w: StepWork, parallel: Parallel, sharded, st,
                    spec: ModelSpec, gpu: GPUSpec) -> tuple:
    """The part of :func:`_step_time` its optimiser's seconds do not enter: ``(micro-step seconds with the
    techniques' cost, parts, interconnect s, host s, overlapped compute and communication, tokens per step,
    accumulation x model FLOPs)``."""
    parts = dict(parts)
    # memory-saving techniques (stacks.toml) add their assumed fraction of step time
    cost = (sum(t.cost_for(cfg) for name, t in techniques().items() if cfg.uses(name))
            if cfg.techniques or cfg.stack.techniques else 0)  # (none on: nothing to look up)
    if cost:
        parts["techniques_s"] = micro * cost
        micro = micro * (1.0 + cost)
    comm = comm_volume(spec, cfg, parallel, gpu, state=sharded, st=st) if parallel.distributed else Comm()
    net_s, host_s = comm.seconds(a)
    return micro, parts, net_s, host_s, overlap(a * micro, net_s), w.tokens * a * parallel.gpus, a * w.model_flops


def _with_optimizer(micro, parts: dict, net_s, host_s, overlapped, tokens_step, flops, a, opt_s: float, peak: float,
                    calibrated: bool, source: str) -> StepTime:
    """The :class:`StepTime` of :func:`_optimizer_free`'s part and the optimiser's seconds ``opt_s``."""
    step, tps, ach, mfu, (opt_part, comm_part, host_part) = _step_arrays(overlapped, opt_s, net_s, host_s, tokens_step,
                                                                         flops, peak)
    parts = dict(parts)
    parts.update(optimizer_s=opt_part, comm_s=comm_part, host_s=host_part)
    return StepTime(step_s=step, micro_s=micro, optimizer_s=opt_s, comm_s=net_s, host_s=host_s, tokens_per_step=tokens_step,
                    tokens_per_s=tps, achieved_tflops=ach, mfu=mfu, grad_accum=a, calibrated=calibrated,
                    source=source, parts=parts)


def _step_arrays(overlapped, opt_s, net_s, host_s, tokens_step, flops, peak: float) -> tuple:
    """``(step s, tokens/s, achieved TFLOP/s, MFU, (optimizer, comm, host seconds as parts))`` of an optimiser step:
    the overlapped micro-steps, the optimiser's seconds ``opt_s`` and the host's. Elementwise: ``opt_s`` may be a
    column over configurations (:func:`_group_times`), each row then what one configuration's float gives."""
    step = overlapped + opt_s + host_s
    ach = flops / step / 1e12
    zeros = 0 * step
    return step, tokens_step / step, ach, ach * 1e12 / peak, (opt_s + zeros, net_s + zeros, host_s + zeros)


def _default_source(eff: Efficiency, use_profile: bool) -> str:
    """The ``source`` of a step time from the default efficiencies ``eff`` (no profile, or ``use_profile`` False)."""
    return (f"defaults for {eff.card_class} cards ({eff.matmul_source}; stack efficiency {eff.stack:g}); "
            f"no calibration profile" + ("" if use_profile else " used"))


def _default_micro(spec: ModelSpec, gpu: GPUSpec, w: StepWork, prof, eff: Efficiency, peak: float) -> tuple:
    """``(seconds, parts)`` of one micro-step from the default efficiencies (no profile's step-time model):
    compute (the matmul rate over the tokens, or the kernel launches), QLoRA's dequantisation (at ``prof``'s
    measured rate where it has one), DoRA's weight norms, eager attention's score traffic, the rollout's prefill
    and decoding. ``peak``: the card's tensor FLOP/s in the regime's compute dtype."""
    bw = gpu.bandwidth_gbs * 1e9 * eff.bandwidth
    width = spec.hidden_size / (spec.hidden_size + WIDTH_HALF)

    def rate(tokens):
        t = np.asarray(tokens, dtype=np.float64)
        return peak * eff.matmul * eff.stack * width * t / (t + TOKENS_HALF)

    train_flops = w.model_flops - w.rollout_flops + w.adapter_flops
    train_passes = w.layer_passes - (1 if w.gen_tokens else 0)  # the rollout's pass is timed as decoding
    compute = np.maximum(train_flops / rate(w.tokens), train_passes * w.layers * LAUNCH_S_PER_LAYER_PASS)
    dequant = w.train_dequant_gparams * 1e9 * DEQUANT_BYTES_PER_PARAM / bw + 0 * compute
    if prof is not None and getattr(prof, "qlora_dequant_s_per_gparam", None):
        dequant = w.train_dequant_gparams * float(prof.qlora_dequant_s_per_gparam) + 0 * compute
    dora = w.dora_params * DORA_BYTES_PER_PARAM / bw + 0 * compute
    eager = w.eager_bytes / bw
    if w.prefill_tokens.any():
        prefill = np.where(w.prefill_tokens > 0, w.prefill_flops / rate(np.maximum(w.prefill_tokens, 1)), 0.0)
    else:  # no prompt prefilled (a method that does not generate): np.where's zeros, without its other branch
        prefill = np.zeros(w.prefill_tokens.shape)
    decode = 0 * compute
    if w.gen_tokens:
        decode = (np.maximum(w.decode_bytes / bw, w.decode_flops / (peak * eff.matmul * eff.stack * width))
                  + w.gen_tokens * w.layers * DECODE_LAUNCH_S_PER_LAYER)
    parts = dict(compute_s=compute, dequant_s=dequant, dora_s=dora, eager_attention_s=eager, rollout_s=prefill + decode)
    return compute + dequant + dora + eager + prefill + decode, parts


def _profile_micro(prof, key: str, w: StepWork, opt_s: float, stack: str):
    """Micro-step seconds from a profile: its step-time model, else its achieved TFLOP/s; None if neither.

    ``stack``: the run's training stack; a profile measured on another stack answers None (its step
    times belong to the stack that measured them, ``profiles.Profile.step_seconds``).
    """
    shape = np.shape(w.model_flops)
    flops = np.ravel(w.model_flops)
    toks = np.ravel(np.broadcast_to(w.tokens, shape))
    out = np.empty(flops.shape)
    step_seconds = getattr(prof, "step_seconds", None)
    achieved = getattr(prof, "achieved_tflops", None)
    if step_seconds is not None:
        from .profiles import step_features

        for i, (f, t) in enumerate(zip(flops, toks)):
            feats = step_features(flops=float(f), layers=w.layers, hidden=w.hidden, passes=w.layer_passes,
                                  gen_tokens=w.gen_tokens)
            v = step_seconds(key, feats, dequant_gparams=w.dequant_gparams, stack=stack)
            if v is None:
                break
            out[i] = v
        else:
            # the profile timed whole steps (one micro-step + the update): take the update out once
            return np.maximum(out - opt_s, 0.5 * out).reshape(shape)
    if achieved is not None:
        for i, (f, t) in enumerate(zip(flops, toks)):
            v = achieved(key, int(t), stack=stack)
            if v is None or v <= 0:
                return None
            out[i] = f / (v * 1e12)
        return np.maximum(out - opt_s, 0.5 * out).reshape(shape)
    return None


def time_to_train(tokens: float | None, epochs: float, tokens_per_s: float, gpus: int = 1) -> tuple[float | None, float | None]:
    """(seconds, GPU-hours) to train ``tokens`` x ``epochs`` at ``tokens_per_s`` on ``gpus`` GPUs."""
    if tokens is None or not tokens_per_s:
        return None, None
    seconds = float(tokens) * float(epochs) / float(tokens_per_s)
    return seconds, seconds * gpus / 3600.0


_COUNT_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(value, label: str = "--tokens") -> float | None:
    """Read a token count: ``1000000``, ``"2.5e9"``, ``"500M"``, ``"2B"`` (None stays None).

    Raises:
        VramplanError: not a positive number.
    """
    from .errors import VramplanError

    if value is None:
        return None
    if isinstance(value, bool):
        raise VramplanError(f"{label} must be a positive number of tokens, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        n = float(value)
    else:
        text = str(value).strip().lower().replace(",", "").replace("_", "")[:64]
        suffix = text[-1:] if text[-1:] in _COUNT_SUFFIX and text[-1:] != "" else ""
        try:
            n = float(text[: len(text) - len(suffix)] if suffix else text) * _COUNT_SUFFIX[suffix]
        except ValueError:
            raise VramplanError(f"cannot read {label} {value!r}", "write it like 500M, 2B or 1.5e9") from None
    if not np.isfinite(n) or n <= 0:
        raise VramplanError(f"{label} must be a positive number of tokens, got {str(value)[:40]!r}")
    if n > 1e18:
        raise VramplanError(f"{label} {str(value)[:40]} is more than 10^18 tokens", "write it like 500M, 2B or 1.5e9")
    return n
