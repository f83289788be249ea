"""Config problems: what a rejected configuration reports, one ``path: message`` line per problem.

The compiler collects every problem it finds before raising, so one ``meshgate check`` run shows the whole list.
``path`` is where the problem sits in the document (``routes[0].match.path``), or ``(document)`` / ``line L, column
C`` when the text could not be decoded at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["DOCUMENT", "ConfigError", "Problem"]

# The path of a problem that belongs to the document as a whole (empty, not a mapping, undecodable).
DOCUMENT = "(document)"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config: where (``path``) and what (``message``, user-facing, no trailing period)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(Exception):
    """A config was rejected; ``problems`` lists every problem found, in the order they were checked."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        if not self.problems:
            # An error without a reason would print nothing, which reads as success to a user.
            raise ValueError("ConfigError needs at least one problem")
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[Problem, ...]]]:
        # The default reduce would rebuild from the message string; workers pass errors across processes.
        return (ConfigError, (self.problems,))
