"""One root exception; each subclass carries the value that was wrong."""

from __future__ import annotations


class IntakeError(Exception):
    """Root of every error Intake raises on purpose."""


class ConfigError(IntakeError):
    """A setting is missing, unknown or has a value that breaks a rule."""

    def __init__(self, setting: str, problem: str, value: object = None) -> None:
        self.setting = setting
        self.problem = problem
        self.value = value
        shown = "" if value is None else f" (got {value!r})"
        super().__init__(f"setting {setting}: {problem}{shown}")


class Unparseable(IntakeError):
    """Raw input that cannot become an ``Inbound``; it goes to the quarantine."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StoreUnavailable(IntakeError):
    """The database could not take a write; the sender must try again later."""
