"""Errors that the CLI turns into one line on stderr and exit code 2.

Library code raises :class:`VramplanError` (or a subclass) for every kind of bad
input: an unknown model or GPU, an impossible shape, a corrupt profile, a missing
optional dependency. The message is one sentence; ``hint`` is an optional second
clause (``did you mean rtx4000ada?``) that the CLI appends after ``;``.
"""

from __future__ import annotations

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


class InputError(VramplanError):
    """A value from the user (flag, argument, config key) that is the wrong type or out of range."""


class CardUnsupportedError(InputError):
    """The card cannot run what was asked of it (a precision without bf16, an attention kernel, 4-bit kernels):
    a search over cards (``fit --gpu all``) skips it."""


class FileError(VramplanError):
    """A user file that cannot be read as what it should be (missing, binary, too large, malformed)."""


class WriteError(VramplanError):
    """An output that could not be written (disk full, read-only, permission); nothing half-written is left."""


class LockError(VramplanError):
    """Another process holds the file (one writer per calibration log)."""


class ProfileError(VramplanError):
    """A calibration profile is corrupt or has an unknown schema version."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str | None:
    """Return ``"did you mean X?"`` for the closest of ``choices``, or None."""
    choices = list(choices)
    import difflib  # only on the error path: not imported by `import vramplan`

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
    choices = [str(c) for c in choices]
    shown = name if len(name) <= 60 else name[:57] + "..."
    hint = did_you_mean(name, choices) if len(name) <= 200 else None
    if listing:
        hint = hint or f"see `{listing}` for the list"
    elif len(choices) <= 20:  # a short enum: list its valid values
        hint = (hint + " " if hint else "") + "valid: " + ", ".join(choices)
    return UnknownNameError(f"unknown {kind} {shown!r}", hint)


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            f"{module} is not installed ({exc.__class__.__name__}: {exc})",
            install_hint(extra),
        ) from None


def install_hint(extra: str) -> str:
    """How to install an extra *where the user is*: ``pip install -e ".[extra]"`` from a source checkout
    (a ``pyproject.toml`` beside the package), ``pip install 'vramplan[extra]'`` otherwise."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "vramplan").is_dir():
        return f'install it with `pip install -e "{root}[{extra}]"` (this source checkout)' if Path.cwd() != root \
            else f'install it with `pip install -e ".[{extra}]"` (this source checkout)'
    return f"install it with `pip install 'vramplan[{extra}]'`"
