"""Errors a user can cause, reported as one line without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user asked for: a name, a value, a path or a file.

    The message is meant to be shown on its own: it says what was wrong and what is accepted.
    """


class UnknownNameError(UserError, KeyError):
    """A name that is not among the registered or configured ones."""

    def __init__(self, kind: str, name: str, accepted: list[str]) -> None:
        self.kind, self.name, self.accepted = kind, name, sorted(accepted)
        super().__init__(
            f"unknown {kind} '{name}'; accepted: {', '.join(self.accepted) or '(none)'}"
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]
