"""Data types shared by loaders, splits, prompts and stages: `Problem`, `RowError`, `LoadResult`.

A `Problem` is one math question with its gold answer, already normalised from whatever dataset schema it came
from. Its identity for splits and de-duplication is `content_hash()` (prompt + answer), not `id`: ids differ
between mirrors of the same dataset, content does not.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, field

from megatron_s2d.errors import S2DError


def normalize_text(text: str) -> str:
    """NFC unicode form, whitespace runs collapsed to one space, stripped. Used for content hashing."""
    return " ".join(unicodedata.normalize("NFC", text).split())


@dataclass(frozen=True)
class Problem:
    """One math problem.

    id: identifier, unique within its source (e.g. "aime2024/60"); prompt: the question text without any chat
    template or answer-format instruction; answer: the gold answer as text ("42", "\\frac{1}{2}");
    source: dataset name ("dapo-math-17k", "math", ...); meta: extra columns (level, subject, url, ...), not part
    of equality or hashing; solution: the reference worked solution where the data has one (MATH's ``solution``,
    the toy's ``solution_text``; None for DAPO), not part of equality or hashing (splits do not move when a pool
    gains solutions). ``teacher_sft`` with ``sft.source: solutions`` trains on it: a label, like the answer.
    """

    id: str
    prompt: str
    answer: str
    source: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    solution: str | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name in ("id", "prompt", "answer", "source"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise S2DError(f"Problem.{name} must be a str, got {type(value).__name__}")
            if not value.strip():
                raise S2DError(f"Problem.{name} is empty (id={self.id!r})")
        if not isinstance(self.meta, dict):
            raise S2DError(f"Problem.meta must be a dict, got {type(self.meta).__name__} (id={self.id!r})")
        if self.solution is not None and (not isinstance(self.solution, str) or not self.solution.strip()):
            raise S2DError(f"Problem.solution must be a non-empty str or None (id={self.id!r})")

    def content_hash(self) -> str:
        """sha256 hex of the normalised prompt and answer: the key for splits and de-duplication."""
        payload = normalize_text(self.prompt) + "\n\x1f\n" + normalize_text(self.answer)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        """The project's normalised schema: {id, prompt, answer, source, meta[, solution]} (``solution`` only where
        there is one, so a pool without solutions writes the rows it always wrote)."""
        row = {"id": self.id, "prompt": self.prompt, "answer": self.answer, "source": self.source, "meta": self.meta}
        return row if self.solution is None else {**row, "solution": self.solution}


@dataclass(frozen=True)
class RowError:
    """A row a loader could not turn into a `Problem`. row is 1-based (the line number for .jsonl files)."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


@dataclass
class LoadResult:
    """What a loader produced: the problems, and every row it skipped with the reason (nothing is dropped
    silently). n_rows counts the rows read, so n_rows == n_loaded + n_skipped."""

    source: str
    problems: list[Problem] = field(default_factory=list)
    skipped: list[RowError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    schema: str = ""

    @property
    def n_loaded(self) -> int:
        return len(self.problems)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_rows(self) -> int:
        return self.n_loaded + self.n_skipped

    def summary(self) -> str:
        """One line for logs, e.g. "math500 (schema math500): 498 problems from 500 rows, 2 skipped"."""
        line = f"{self.source} (schema {self.schema}): {self.n_loaded} problems from {self.n_rows} rows"
        if self.skipped:
            line += f", {self.n_skipped} skipped (first: {self.skipped[0]})"
        return line
