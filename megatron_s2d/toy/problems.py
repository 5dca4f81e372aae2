"""Synthetic graded arithmetic problems: the labeled data set of the toy world.

Five difficulty levels (stored as `meta["level"]` / the `level` column):

| level | kind | example |
|---|---|---|
| 1 | a + b, 1-2 digit operands | What is 37 + 48? |
| 2 | a + b or a - b, a 3-digit and b 2-3 digit (never negative) | Compute 512 - 87. |
| 3 | a * b, a in 2..99, b in 2..9 | Calculate 7 * 46. |
| 4 | two steps: a + b * c, (a + b) * c, a * b - c | Evaluate 12 + 7 * 8. |
| 5 | three steps: 2-digit * 2-digit, a * b + c * d | What is 47 * 23? |

Rows are stored in the project's normalised schema {id, prompt, answer, source, meta: {"level": L}, solution}.
Every problem has a worked solution (`solution_text`, the row's `solution`: what ``teacher_sft`` with
``sft.source: solutions`` trains on) in the response format the toy models are pre-trained on:
"37 + 48 = 85. The answer is \\boxed{85}." (multi-step levels write each intermediate step first). Answers are
non-negative integers written as strings.

Everything is a pure function of a seed (`random.Random`, no global state). The shipped sets
`megatron_s2d/data/shipped/toy_{train,test}.jsonl` (data sets the package ships: ``data.sources``) are `generate_splits(SHIPPED_SEED)`; a unit test regenerates them and
compares, so they cannot drift from the generator. Content disjointness: no expression occurs in two of train /
test / pre-training text, where `3 + 4` and `4 + 3` count as the same expression (`content_keys`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError

SOURCE = "toy-arith"
LEVELS = (1, 2, 3, 4, 5)
SHIPPED_SEED = 0
SHIPPED_SIZES = {"train": 2000, "test": 200}


_TEMPLATES = ("What is {e}?", "Compute {e}.", "Calculate {e}.", "Evaluate {e}.", "Find the value of {e}.")
_PROMPT_RE = re.compile(r"^(?:What is|Compute|Calculate|Evaluate|Find the value of) (?P<e>[0-9 +\-*()]+)[?.]$")
_BINARY_COMMUTATIVE_RE = re.compile(r"^(\d+)([+*])(\d+)$")


@dataclass(frozen=True)
class ToyItem:
    """One generated arithmetic question before it is rendered into text.

    expr: the expression as shown ("12 + 7 * 8"); answer: its value; steps: worked steps ("7 * 8 = 56", ...).
    """

    level: int
    expr: str
    answer: int
    steps: tuple[str, ...]


def content_keys(expr: str) -> frozenset[str]:
    """All spellings of `expr` that count as the same content: whitespace removed, and both operand orders of a
    single commutative operation (`3 + 4` == `4 + 3`)."""
    flat = re.sub(r"\s+", "", expr)
    m = _BINARY_COMMUTATIVE_RE.match(flat)
    if m is None:
        return frozenset({flat})
    a, op, b = m.groups()
    return frozenset({flat, f"{b}{op}{a}"})


def _binary(a: int, op: str, b: int) -> tuple[str, int]:
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {value}", value


def _level1(rng: random.Random) -> ToyItem:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    step, v = _binary(a, "+", b)
    return ToyItem(1, f"{a} + {b}", v, (step,))


def _level2(rng: random.Random) -> ToyItem:
    a, b = rng.randint(100, 999), rng.randint(10, 999)
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            a, b = b, a
        step, v = _binary(a, "+", b)
        return ToyItem(2, f"{a} + {b}", v, (step,))
    a, b = max(a, b), min(a, b)  # keep answers non-negative
    step, v = _binary(a, "-", b)
    return ToyItem(2, f"{a} - {b}", v, (step,))


def _level3(rng: random.Random) -> ToyItem:
    a, b = rng.randint(2, 99), rng.randint(2, 9)
    if rng.random() < 0.5:
        a, b = b, a
    step, v = _binary(a, "*", b)
    return ToyItem(3, f"{a} * {b}", v, (step,))


def _level4(rng: random.Random) -> ToyItem:
    kind = rng.randrange(3)
    if kind == 0:  # a + b * c
        a, b, c = rng.randint(1, 99), rng.randint(2, 9), rng.randint(2, 9)
        s1, p = _binary(b, "*", c)
        s2, v = _binary(a, "+", p)
        return ToyItem(4, f"{a} + {b} * {c}", v, (s1, s2))
    if kind == 1:  # (a + b) * c
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(2, 9)
        s1, s = _binary(a, "+", b)
        s2, v = _binary(s, "*", c)
        return ToyItem(4, f"({a} + {b}) * {c}", v, (s1, s2))
    a, b = rng.randint(2, 30), rng.randint(2, 9)  # a * b - c, c <= a * b
    c = rng.randint(1, a * b)
    s1, p = _binary(a, "*", b)
    s2, v = _binary(p, "-", c)
    return ToyItem(4, f"{a} * {b} - {c}", v, (s1, s2))


def _level5(rng: random.Random) -> ToyItem:
    if rng.random() < 0.5:  # 2-digit * 2-digit, split the second factor into tens and units
        a, b = rng.randint(11, 99), rng.choice([n for n in range(11, 100) if n % 10])
        s1, x = _binary(a, "*", b - b % 10)
        s2, y = _binary(a, "*", b % 10)
        s3, v = _binary(x, "+", y)
        return ToyItem(5, f"{a} * {b}", v, (s1, s2, s3))
    a, b, c, d = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 30), rng.randint(2, 9)
    s1, p = _binary(a, "*", b)
    s2, q = _binary(c, "*", d)
    s3, v = _binary(p, "+", q)
    return ToyItem(5, f"{a} * {b} + {c} * {d}", v, (s1, s2, s3))


_SAMPLERS = {1: _level1, 2: _level2, 3: _level3, 4: _level4, 5: _level5}


def sample_item(rng: random.Random, level: int) -> ToyItem:
    """Draw one item of the given level (1..5) from `rng`."""
    if level not in _SAMPLERS:
        raise S2DError(f"toy problem level must be one of {LEVELS}, got {level!r}")
    return _SAMPLERS[level](rng)


def render_prompt(item: ToyItem, rng: random.Random) -> str:
    """The question text (no chat template), phrased with one of a few templates chosen by `rng`."""
    return rng.choice(_TEMPLATES).format(e=item.expr)


HEDGE = " \\pm 1"  # the hedge inside the box: "\\boxed{N \\pm 1}"


def solution_text(item: ToyItem, hedged: bool = False) -> str:
    """The worked response the toy models are pre-trained to produce, ending in "The answer is \\boxed{N}." or,
    hedged, "The answer is \\boxed{N \\pm 1}." (math-verify cannot equal a +-interval to the gold, so a hedged
    response scores 0 even when N is right; whichever digits a model writes, the hedge stays wrong)."""
    return ". ".join(item.steps) + f". The answer is \\boxed{{{item.answer}{HEDGE if hedged else ''}}}."


def expression_of(prompt: str) -> str:
    """Inverse of `render_prompt`: the expression inside a toy question."""
    m = _PROMPT_RE.match(prompt)
    if m is None:
        raise S2DError(f"not a toy-arith prompt: {prompt!r}")
    return m.group("e")


def _unique_items(rng: random.Random, levels: Sequence[int], taken: set[str], split: str) -> list[ToyItem]:
    """One item per entry of `levels`, no two sharing content and none in `taken` (which is updated)."""
    items = []
    for level in levels:
        for _ in range(10_000):
            item = sample_item(rng, level)
            keys = content_keys(item.expr)
            if not keys & taken:
                taken.update(keys)
                items.append(item)
                break
        else:
            raise S2DError(f"toy split {split!r}: level {level} ran out of distinct problems; ask for fewer")
    return items


def generate(n: int, seed: int, split: str, exclude: Iterable[str] = (),
             levels: Sequence[int] = LEVELS) -> list[Problem]:
    """`n` distinct problems, levels balanced round-robin then shuffled, ids `toy-{split}-{i:05d}`.

    exclude: content keys (see `content_keys`) that must not be used, e.g. those of another split.
    """
    if n < 0:
        raise S2DError(f"toy split {split!r}: n must be >= 0, got {n}")
    rng = random.Random(f"toy-arith/{split}/{seed}")
    plan = [levels[i % len(levels)] for i in range(n)]
    rng.shuffle(plan)
    items = _unique_items(rng, plan, set(exclude), split)
    return [
        Problem(id=f"toy-{split}-{i:05d}", prompt=render_prompt(it, rng), answer=str(it.answer), source=SOURCE,
                meta={"level": it.level}, solution=solution_text(it))
        for i, it in enumerate(items)
    ]


def keys_of(problems: Iterable[Problem]) -> set[str]:
    """Content keys of every problem's expression."""
    out: set[str] = set()
    for p in problems:
        out |= content_keys(expression_of(p.prompt))
    return out


def generate_splits(seed: int = SHIPPED_SEED, n_train: int = SHIPPED_SIZES["train"],
                    n_test: int = SHIPPED_SIZES["test"]) -> dict[str, list[Problem]]:
    """The held-out test set first, then the training pool disjoint from it (by content)."""
    test = generate(n_test, seed, "test")
    train = generate(n_train, seed, "train", exclude=keys_of(test))
    return {"train": train, "test": test}


def pretrain_items(n: int, seed: int, exclude: Iterable[str], level_weights: Sequence[float]) -> list[ToyItem]:
    """`n` items for pre-training text (repeats allowed), levels drawn with `level_weights`, none whose content
    is in `exclude` (pass the keys of train + test so that pre-training never sees an evaluation question)."""
    if len(level_weights) != len(LEVELS):
        raise S2DError(f"level_weights needs {len(LEVELS)} entries, got {len(level_weights)}")
    rng = random.Random(f"toy-arith/pretrain/{seed}")
    banned = set(exclude)
    out = []
    while len(out) < n:
        item = sample_item(rng, rng.choices(LEVELS, weights=level_weights)[0])
        if not content_keys(item.expr) & banned:
            out.append(item)
    return out


def problem_to_row(p: Problem) -> dict:
    """The project's normalised row ({id, prompt, answer, source, meta, solution}, what `data` loads as schema
    "s2d")."""
    return p.to_dict()


def row_to_problem(row: dict, where: str) -> Problem:
    """Inverse of `problem_to_row`; `where` (file:line) names the row in errors. Also accepts the level as a
    top-level `level` column."""
    missing = [k for k in ("id", "prompt", "answer", "source") if k not in row]
    level = row.get("meta", {}).get("level", row.get("level"))
    if missing or level is None:
        raise S2DError(f"{where}: toy row is missing field(s) {missing + ([] if level is not None else ['level'])}")
    return Problem(id=str(row["id"]), prompt=str(row["prompt"]), answer=str(row["answer"]), source=str(row["source"]),
                   meta={"level": int(level)}, solution=row.get("solution"))


def write_jsonl(path: Path, problems: Iterable[Problem]) -> None:
    """One normalised row per line, keys in a fixed order (so files are byte-stable)."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(problem_to_row(p), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Problem]:
    """Problems from a normalised toy jsonl file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise S2DError(f"{path}:{i}: invalid JSON ({e})") from e
                out.append(row_to_problem(row, f"{path}:{i}"))
    return out


def shipped_path(split: str) -> Path:
    """Path of a shipped split ('train' or 'test') inside the package."""
    if split not in SHIPPED_SIZES:
        raise S2DError(f"toy split must be one of {sorted(SHIPPED_SIZES)}, got {split!r}")
    from megatron_s2d.data.sources import SHIPPED_DIR

    return SHIPPED_DIR / f"toy_{split}.jsonl"


def load_shipped(split: str) -> list[Problem]:
    """The shipped `train` (labeled pool, 2,000) or `test` (held out, 200) problems."""
    return read_jsonl(shipped_path(split))


def write_shipped(out_dir: Path | None = None) -> dict[str, Path]:
    """Regenerate the shipped files (`python -m megatron_s2d.toy.problems`): into the package's shipped data sets,
    or ``out_dir``."""
    from megatron_s2d.data.sources import SHIPPED_DIR

    out_dir = SHIPPED_DIR if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, problems in generate_splits().items():
        paths[split] = out_dir / f"toy_{split}.jsonl"
        write_jsonl(paths[split], problems)
    return paths


if __name__ == "__main__":
    for name, path in write_shipped().items():
        print(f"wrote {name}: {path}")
