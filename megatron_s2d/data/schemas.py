"""Row converters: one dataset schema -> `Problem`. Shared by the hub loaders and the local-file loaders.

Schemas (column names verified against the dataset cards on the Hugging Face hub, see `sources.py`):
- "dapo":    BytedTsinghua-SIA/DAPO-Math-17k. prompt = [{"role": "user", "content": ...}], reward_model =
             {"ground_truth": ..., "style": "rule"}, extra_info = {"index": ...}, data_source, ability. The DAPO
             answer-format wrapper ("Solve the following math problem step by step. The last line ... Answer:
             $Answer ..." / "Remember to put your answer on its own line after "Answer:".") is removed, because our
             prompt builder adds its own \\boxed{} instruction; meta["dapo_wrapper_removed"] records it.
- "math":    EleutherAI/hendrycks_math (problem, level, type, solution). Gold = content of the last \\boxed{} of
             the solution; a solution without one is a malformed row.
- "math500": HuggingFaceH4/MATH-500 (problem, solution, answer, subject, level, unique_id).
- "aime":    problem + answer, optional id/solution/url/year (HuggingFaceH4/aime_2024, AIME 2025 mirrors).
             Integer answers (some mirrors store int64) are converted to text.
- "s2d":     the project's own normalised schema {id, prompt, answer, source[, meta][, solution]}.
A worked reference solution is kept as `Problem.solution` where the row has one (MATH, MATH-500, AIME mirrors with
a `solution` column, s2d rows with `solution`: the shipped toy sets); DAPO rows have none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from megatron_s2d.errors import S2DError
from megatron_s2d.data.types import Problem
from megatron_s2d.rewards.extract import last_boxed


class RowProblem(Exception):
    """A row is malformed; the message is the reason. Loaders turn it into a `RowError`."""


DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'


def _text(row: dict, key: str, *, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise RowProblem(f"missing '{key}'")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowProblem(f"'{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowProblem(f"empty '{key}'")
    return value


def _answer(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise RowProblem(f"missing '{key}'")
    if not isinstance(value, str):
        raise RowProblem(f"'{key}' must be a string or an integer, got {type(value).__name__}")
    if not value.strip():
        raise RowProblem(f"empty '{key}'")
    return value.strip()


def _solution(row: dict) -> str | None:
    """The row's optional worked ``solution`` (None when absent, null or blank)."""
    value = _text(row, "solution", required=False)
    return value if value is not None and value.strip() else None


def _raw_id(row: dict, key: str, row_no: int) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return f"row{row_no}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowProblem(f"'{key}' must be a string or an integer, got {type(value).__name__}")
    return str(value).strip()


def strip_dapo_wrapper(text: str) -> tuple[str, bool]:
    """Remove DAPO's answer-format instruction around the question. Returns (question, wrapper_was_present)."""
    body = text.strip()
    removed = False
    if body.startswith(DAPO_PREFIX):
        body, removed = body[len(DAPO_PREFIX) :].strip(), True
    if body.endswith(DAPO_SUFFIX):
        body, removed = body[: -len(DAPO_SUFFIX)].strip(), True
    return body, removed


def _dapo(row: dict, row_no: int, source: str) -> Problem:
    messages = row.get("prompt")
    if not isinstance(messages, list) or not messages:
        raise RowProblem("'prompt' must be a non-empty list of chat messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise RowProblem("'prompt' has no user message with string 'content'")
    question, removed = strip_dapo_wrapper(users[-1]["content"])
    if not question:
        raise RowProblem("empty question in 'prompt'")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict):
        raise RowProblem("'reward_model' must be a dict with 'ground_truth'")
    answer = _answer(reward_model, "ground_truth")
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    meta = {"dapo_wrapper_removed": removed}
    for key in ("data_source", "ability"):
        if row.get(key) is not None:
            meta[key] = row[key]
    return Problem(f"{source}/{_raw_id(extra, 'index', row_no)}", question, answer, source, meta)


def _math(row: dict, row_no: int, source: str) -> Problem:
    problem = _text(row, "problem")
    solution = _text(row, "solution")
    found, boxed = last_boxed(solution)
    if not found or boxed is None or not boxed.strip():
        raise RowProblem("'solution' has no complete \\boxed{} answer")
    meta = {k: row[k] for k in ("level", "type") if row.get(k) is not None}
    subject = row.get("_config") or row.get("type") or "math"
    return Problem(f"{source}/{subject}/{row_no}", problem, boxed.strip(), source, meta, solution=solution)


def _math500(row: dict, row_no: int, source: str) -> Problem:
    problem = _text(row, "problem")
    answer = _answer(row, "answer")
    meta = {k: row[k] for k in ("subject", "level", "unique_id") if row.get(k) is not None}
    return Problem(f"{source}/{_raw_id(row, 'unique_id', row_no)}", problem, answer, source, meta,
                   solution=_solution(row))


def _aime(row: dict, row_no: int, source: str) -> Problem:
    problem = _text(row, "problem")
    answer = _answer(row, "answer")
    meta = {k: row[k] for k in ("url", "year") if row.get(k) is not None}
    return Problem(f"{source}/{_raw_id(row, 'id', row_no)}", problem, answer, source, meta, solution=_solution(row))


def _s2d(row: dict, row_no: int, source: str) -> Problem:
    prompt = _text(row, "prompt")
    answer = _answer(row, "answer")
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise RowProblem(f"'meta' must be a dict, got {type(meta).__name__}")
    row_source = _text(row, "source", required=False)
    return Problem(_raw_id(row, "id", row_no), prompt, answer, row_source or source, dict(meta),
                   solution=_solution(row))


CONVERTERS: dict[str, Callable[[dict, int, str], Problem]] = {
    "dapo": _dapo,
    "math": _math,
    "math500": _math500,
    "aime": _aime,
    "s2d": _s2d,
}


def detect_schema(columns: Iterable[str], where: str) -> str:
    """Schema name for a set of column names; S2DError naming `where` and the columns if none fits."""
    cols = set(columns)
    if {"prompt", "reward_model"} <= cols:
        return "dapo"
    if {"id", "prompt", "answer"} <= cols:
        return "s2d"
    if {"problem", "answer", "unique_id"} <= cols:
        return "math500"
    if {"problem", "answer"} <= cols:
        return "aime"
    if {"problem", "solution"} <= cols:
        return "math"
    raise S2DError(
        f"{where}: cannot detect the schema from columns {sorted(cols)}; expected one of: DAPO (prompt, "
        "reward_model), s2d (id, prompt, answer), MATH-500 (problem, answer, unique_id), AIME (problem, answer), "
        "MATH (problem, solution); or pass schema= explicitly"
    )


def convert_row(schema: str, row: object, row_no: int, source: str) -> Problem:
    """Convert one row; raises RowProblem with the reason when the row is malformed."""
    if not isinstance(row, dict):
        raise RowProblem(f"row must be an object/dict, got {type(row).__name__}")
    try:
        return CONVERTERS[schema](row, row_no, source)
    except S2DError as e:  # Problem.__post_init__ validation
        raise RowProblem(str(e)) from e
