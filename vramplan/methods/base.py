"""The behaviour contract of a training method, with supervised fine-tuning's defaults.

A method's *data* (model copies, sequences per example, loss kind) lives in ``methods.toml``;
its *behaviour* lives in one subclass of :class:`Behaviour`, in one module of this package,
named by the method's ``behaviour`` field. Every layer of vramplan reaches the behaviour
through ``recipe.behaviour`` (or ``cfg.recipe.behaviour``) and never compares a method's name.
A subclass overrides only what differs from supervised fine-tuning.

Numpy only: nothing here imports torch. The real training step is named as data
(:attr:`Behaviour.step`, ``"module:function"``) and imported by the runtime on use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import VramplanError


@dataclass(frozen=True)
class Option:
    """One knob a method takes besides the common ones (PPO's response length, GRPO's G ...).

    The CLI adds ``flag`` to estimate/fit/dryrun from the registry; :func:`vramplan.make_config`
    accepts ``name=`` (``method_options={name: value}``) and validates it here; the resolved value
    rides on the :class:`~vramplan.config.TrainConfig` (``cfg.option(name)``).

    Attributes:
        name: the keyword (``ppo_response``); also the TrainConfig attribute when one exists.
        kind: ``"int"``, ``"float"``, ``"str"`` or ``"bool"``.
        default: the value when not given; ``None`` when :meth:`Behaviour.resolve_options`
            derives it (from the sequence length, say).
        flag: the CLI flag (``--ppo-response``).
        help: one line for ``--help``.
        lo, hi: inclusive bounds of a number (``None``: unbounded).
        choices: the allowed values of a ``str`` option (empty: any).
        shape: True when the value follows the sequence length: searches that vary the length
            reset it (:meth:`Behaviour.reset_shape`) so each length takes its own default.
        trainer_keys: the keys of trainer configs (TRL, Axolotl) that set it.
    """

    name: str
    kind: str
    default: Any = None
    flag: str = ""
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    shape: bool = False
    trainer_keys: tuple[str, ...] = ()

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """``value`` checked and converted to :attr:`kind`; ``None`` stays ``None``.

        Raises:
            VramplanError: the wrong type, out of bounds, or not one of :attr:`choices`.
        """
        if value is None:
            return None
        from .. import validate as v

        label = self.cli_flag.lstrip("-")
        if self.kind == "int":
            lo = int(self.lo) if self.lo is not None else 1
            return v.integer(value, label, lo=lo, hi=None if self.hi is None else int(self.hi))
        if self.kind == "float":
            return v.real(value, label, lo=self.lo, hi=self.hi)
        if self.kind == "bool":
            return v.flag(value, label, none_ok=False)
        if self.kind == "str":
            if self.choices:
                return v.choice(value, label, self.choices)
            return v.name_text(value, label)
        raise VramplanError(f"option {self.name!r} has an unknown kind {self.kind!r}")


@dataclass(frozen=True)
class Generation:
    """What one training step generates before its update (PPO's rollout, GRPO's completions).

    All counts are tokens or sequences (ints, or numpy arrays broadcast with the sequence grid).

    Attributes:
        prompt_tokens: tokens prefilled per generated sequence.
        generated_tokens: tokens decoded per generated sequence (the KV cache grows to
            ``prompt_tokens + generated_tokens``).
        sequences_per_example: sequences generated per example of the micro-batch.
        shared_by: micro-batches one generation serves (GRPO's ``steps_per_generation``: the whole
            generation batch decodes together, so each decode step's weight reads are shared by them).
        scoring_forwards: no-grad forwards over prompt + generated tokens counted with the generation
            (PPO's one; GRPO's old-policy and reference log-probs, when kept).
    """

    prompt_tokens: Any
    generated_tokens: Any
    sequences_per_example: int = 1
    shared_by: int = 1
    scoring_forwards: int = 1


class Behaviour:
    """Supervised fine-tuning (full, LoRA, QLoRA, DoRA, IA³): the defaults every method starts from.

    Hooks (override only what differs; ``cfg`` is a :class:`~vramplan.config.TrainConfig`):

    * :attr:`options` -- the method's own knobs (:class:`Option`), as data.
    * :meth:`resolve_options` -- the validated options of one configuration (defaults filled).
    * :meth:`reset_shape` -- the config changes that let a search vary the sequence length.
    * :attr:`generates` / :meth:`generation` -- whether and what a step generates.
    * :meth:`min_seq` -- the shortest sequence length the method plans (tokens).
    * :meth:`step_terms` -- the method's own terms of the analytic step (a ``vramplan.phases.StepTerms``).
    * :meth:`card_share` -- the share of the card another engine holds (colocated vLLM).
    * :meth:`limits` -- the method's own limits on a card (GRPO: the largest G x completion), for ``fit``.
    * :meth:`request_from_config` -- the method's options read from its trainer config (TRL, Axolotl's ``trl:``).
    * :meth:`assumptions` / :meth:`dryrun_assumptions` -- assumption text for the plan and the dry run.
    * :attr:`step` -- the real torch step the dry run and calibration run (``"module:function"``).
    * :attr:`takes_adapter_choice` -- the recipe names ``method+adapter`` (DPO, PPO) or the adapter alone.
    * :attr:`trainer_names` / :attr:`axolotl_rl` / :attr:`report_names` / :attr:`config_names` -- how trainer
      configs, Axolotl ``rl:`` values, published reports and a config's ``method`` key name the method; :meth:`recognised_by`
      (:attr:`config_keys`) -- the keys that mark a config file as the method's.
    """

    #: the method's own knobs (see :class:`Option`)
    options: tuple[Option, ...] = ()
    #: True when a step generates sequences before the update (a KV cache and a no-grad rollout)
    generates: bool = False
    #: the torch step the dry run and the calibration runner execute, ``"module:function"``
    step: str = "vramplan.runtime.steps:sft_step"
    #: True when the method takes an adapter choice and recipes read ``method+adapter``
    takes_adapter_choice: bool = False
    #: TRL config / trainer class names that mean this method
    trainer_names: tuple[str, ...] = ()
    #: Axolotl ``rl:`` values that mean this method
    axolotl_rl: tuple[str, ...] = ()
    #: values of a trainer config's ``method`` / ``trainer`` key that mean this method besides its registry name
    #: (SFT: ``"sft"``, whatever adapter the run loads)
    config_names: tuple[str, ...] = ()
    #: trainer-config settings that make the plan another registered method: ``(key, value, method)``;
    #: ``value`` True matches any truthy setting (DPO's ``precompute_ref_log_probs`` -> ``dpo-precomputed``)
    variants: tuple[tuple[str, Any, str], ...] = ()
    #: Axolotl top-level keys that, when true, mean this method (``reward_model: true``)
    axolotl_flags: tuple[str, ...] = ()
    #: extra no-grad forwards per step over the micro-batch's tokens, by copy role (``(("policy", 1),)``):
    #: KTO's KL estimate runs the policy and the reference once more on mismatched sequences
    extra_forwards: tuple[tuple[str, int], ...] = ()
    #: lower-case words that name this method in published reports (measurements/importers.py)
    report_names: tuple[str, ...] = ()
    #: keys only this method's trainer config has: a config file holding one is read as this method
    config_keys: frozenset[str] = frozenset()

    def recognised_by(self, keys: set[str]) -> tuple[str, ...]:
        """The keys of a trainer config (a file's top-level keys) that mark it as this method's, sorted; empty: none."""
        return tuple(sorted(self.config_keys & set(keys)))

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def resolve_options(self, values: dict[str, Any], seq: int) -> dict[str, Any]:
        """The options of one configuration: each validated, defaults filled (``values`` holds only this
        method's options; a missing one is ``None``).

        Raises:
            VramplanError: a value out of bounds, or inconsistent with ``seq``.
        """
        return {o.name: (o.validate(values[o.name]) if values.get(o.name) is not None else o.default)
                for o in self.options}

    def reset_shape(self) -> dict[str, Any]:
        """Changes to a config (``cfg.with_(**changes)``) that leave every :attr:`Option.shape` option unset, so
        each sequence length of a search takes the option's own default."""
        return {o.name: None for o in self.options if o.shape}

    def generation(self, cfg: Any, seq: Any = None) -> Generation | None:
        """What one step generates (None: nothing). ``seq`` overrides ``cfg.seq`` (a numpy grid)."""
        return None

    def min_batch(self) -> int:
        """The smallest micro-batch the method's trainer accepts (KTO's KL term needs two sequences)."""
        return 1

    def min_seq(self) -> int:
        """The shortest sequence (tokens) the method's searches consider."""
        return 128

    def precompute_pass(self, model: Any, cfg: Any) -> float | None:
        """Tensor bytes, above the loaded model, of a pass the trainer runs before the first step (TRL's
        ``precompute_ref_log_probs``: a no-grad reference forward over the dataset), or None (no such pass)."""
        return None

    def recipe_for(self, recipe: Any, cfg: Any) -> Any:
        """The recipe (:class:`vramplan.methods.Recipe`) as ``cfg``'s method options make it: a copy an option
        adds (GRPO's reference model with ``beta > 0`` and full training). Default: unchanged."""
        return recipe

    def step_terms(self, model: Any, cfg: Any, terms: Any, batch: Any, seq: Any) -> Any:
        """The terms of one step (a :class:`vramplan.phases.StepTerms` of byte arrays over ``batch``/``seq``)
        as this method changes them (a changed copy: ``terms.with_(...)``); SFT's, DPO's and PPO's are
        computed in :func:`vramplan.memory.step_terms` from the copies and the loss kind."""
        return terms

    def card_share(self, cfg: Any) -> float:
        """The share of the card (0..1) another engine in the training process holds outside the step's tensors
        (GRPO's colocated vLLM); the step is planned in the rest."""
        return 0.0

    def card_share_need(self, spec: Any, cfg: Any) -> tuple[int, int]:
        """What the colocated engine of :meth:`card_share` needs inside its share, in bytes: ``(fixed, wanted)``:
        what it cannot start without (its weights) and what this plan's generation batch wants (weights and
        cache). ``(0, 0)``: no colocated engine."""
        return 0, 0

    def request_from_config(self, data: Any, notes: list[str]) -> dict[str, Any]:
        """Plan options read from a trainer config of this method (a dict, or a config object's attributes):
        ``{"method_options": {...}}`` from each :class:`Option`'s ``trainer_keys`` (the first key present),
        or nothing. A method may add request options (``seq``) or rename values; ``notes`` takes what it says."""
        get = data.get if isinstance(data, dict) else (lambda k, d=None: getattr(data, k, d))
        found = {}
        for o in self.options:
            for key in o.trainer_keys:
                if get(key, None) is not None:
                    found[o.name] = get(key)
                    break
        return {"method_options": found} if found else {}

    def limits(self, spec: Any, cfg: Any, card: Any) -> Any:
        """The method's own limits on ``card`` for ``fit`` (an object with ``to_json()`` and ``lines()``), or None."""
        return None

    def assumptions(self, cfg: Any) -> list[str]:
        """Lines for the plan's assumptions (planner/checks.py)."""
        return []

    def dryrun_assumptions(self, cfg: Any) -> list[str]:
        """Lines for the dry run's assumptions."""
        return []

    def loss_bytes(self, model: Any, copy: Any, regime: Any, tokens: Any, rows: Any, cfg: Any,
                   logits_dtype_bytes: int) -> tuple[Any, Any] | None:
        """``(forward, backward)`` peak bytes of a *training* copy's logits and loss for ``tokens`` tokens
        of ``rows`` sequences, when the method's loss has its own buffers (numpy arrays); ``None`` keeps
        the ``loss`` kind's accounting (vramplan.activations.logits_bytes). ``logits_dtype_bytes``: the
        size of the model's output logits. Soft-capped logits' saved ``tanh`` is added by the caller."""
        return None


SFT = Behaviour()


class Variant:
    """Mixin, listed before the parent behaviour, for a method reached only through its parent's ``variants``
    (``precompute_ref_log_probs=True`` plans ``dpo-precomputed``): it answers to no trainer, Axolotl, report or
    config-key name of its own, and has no variants itself."""

    trainer_names = Behaviour.trainer_names
    axolotl_rl = Behaviour.axolotl_rl
    config_names = Behaviour.config_names
    report_names = Behaviour.report_names
    config_keys = Behaviour.config_keys
    variants = Behaviour.variants
