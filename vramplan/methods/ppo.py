"""PPO (TRL ``PPOTrainer``): generate a response, score it, clipped policy and value updates.

The copies (policy, reference, reward, value) and the ``response_logps`` loss are data in
methods.toml; the rollout's token counts come from :mod:`vramplan.methods.generation`.
"""

from __future__ import annotations

from typing import Any

from .base import Behaviour, Generation, Option
from .generation import split_sequence
from ..errors import VramplanError

RESPONSE = Option(
    name="ppo_response", kind="int", default=None, flag="--ppo-response",
    help="PPO: response tokens generated per sequence (default seq/2)", shape=True,
    trainer_keys=("response_length",))


class PPO(Behaviour):
    options = (RESPONSE,)
    generates = True
    step = "vramplan.runtime.steps:ppo_step"
    takes_adapter_choice = True
    trainer_names = ("PPOConfig", "PPOTrainer")
    axolotl_rl = ()
    report_names = ("ppo",)

    def resolve_options(self, values: dict[str, Any], seq: int) -> dict[str, Any]:
        """The response length: ``--ppo-response``, else half the sequence; 0 < response < seq.

        Raises:
            VramplanError: a response that leaves no prompt (or is empty).
        """
        given = RESPONSE.validate(values.get("ppo_response"))
        resp = given if given is not None else seq // 2
        if not 0 < resp < seq:
            raise VramplanError(f"PPO needs 0 < response tokens < --seq ({seq}), got {resp}")
        return {"ppo_response": resp}

    def generation(self, cfg: Any, seq: Any = None) -> Generation:
        return split_sequence(cfg.seq if seq is None else seq, cfg.option("ppo_response"))

    def min_seq(self) -> int:
        return 256  # a prompt and a response of at least 128 tokens each

    def assumptions(self, cfg: Any) -> list[str]:
        resp = cfg.option("ppo_response")
        return [f"PPO: prompt {cfg.seq - resp} + response {resp} tokens; reward and value "
                "models share the policy's architecture"]

    def dryrun_assumptions(self, cfg: Any) -> list[str]:
        return ["PPO as TRL (rollout without autocast, eval mode; decode loop shortcut to its last two "
                "steps with the cache pre-grown); the value copy trains with the policy's adapter choice"]


BEHAVIOUR = PPO()
