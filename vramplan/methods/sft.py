"""Supervised fine-tuning (full, LoRA, QLoRA, DoRA, IA³): the base behaviour, unchanged.

The defaults live in :class:`vramplan.methods.base.Behaviour`; this module names them so
``methods.toml``'s ``behaviour = "sft"`` reaches them like any other method's module.
"""

from __future__ import annotations

from .base import Behaviour


class SFT(Behaviour):
    """One causal-LM forward and backward of the policy per micro-batch; nothing generated."""

    #: TRL's SFT config/trainer, and HF's plain training arguments (transformers ``Trainer``: supervised)
    trainer_names = ("SFTConfig", "SFTTrainer", "TrainingArguments", "Seq2SeqTrainingArguments")
    config_names = ("sft",)
    axolotl_rl = ()


BEHAVIOUR = SFT()
