"""Errors that the CLI turns into one line on stderr and exit code 2.

Library code raises :class:`VramplanError` (or a subclass) for every kind of bad
input: an unknown model or GPU, an impossible shape, a corrupt profile, a missing
optional dependency. The message is one sentence; ``hint`` is an optional second
clause (``did you mean rtx4000ada?``) that the CLI appends after ``;``.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class VramplanError(Exception):
    """Bad input or environment, reported to the user without a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line, always
        text = self.message if not self.hint else f"{self.message}; {self.hint}"
        return " ".join(text.split())


class UnknownNameError(VramplanError, KeyError):
    """A model, GPU, method or option name that is not in its catalogue."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return VramplanError.__str__(self)


class MissingDependencyError(VramplanError, ImportError):
    """An optional extra (torch, transformers, peft, bitsandbytes, nvidia-ml-py) is missing."""


class ProfileError(VramplanError):
    """A calibration profile is corrupt or has an unknown schema version."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str | None:
    """Return ``"did you mean X?"`` for the closest of ``choices``, or None."""
    choices = list(choices)
    match = difflib.get_close_matches(name.lower(), [c.lower() for c in choices], n=n, cutoff=0.5)
    if not match:
        # substring match catches "4000" -> "rtx4000ada"
        subs = [c for c in choices if name.lower() in c.lower()]
        if not subs:
            return None
        match = subs[:n]
    return "did you mean " + " or ".join(match) + "?"


def unknown(kind: str, name: str, choices: Iterable[str], listing: str | None = None) -> UnknownNameError:
    """Build the error for an unknown catalogue name, with a did-you-mean hint."""
    hint = did_you_mean(name, choices)
    if hint is None and listing:
        hint = f"see `{listing}` for the list"
    return UnknownNameError(f"unknown {kind} {name!r}", hint)


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed ({exc.__class__.__name__}: {exc})",
            f"install it with `pip install 'vramplan[{extra}]'`",
        ) from None
