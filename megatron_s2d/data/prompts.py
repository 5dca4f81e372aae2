"""Prompt text for a problem: the question plus a \\boxed{} instruction, in the tokenizer's chat template.

    text = build_prompt(tokenizer, problem)   # str, ends with the assistant turn opener

With a chat template: `tokenizer.apply_chat_template([{"role": "user", "content": question + "\\n\\n" +
instruction}], tokenize=False, add_generation_prompt=True)`. Without one (base models, tiny local tokenizers)
the plain `PLAIN_TEMPLATE` is used instead, and a warning is emitted once per tokenizer name:

    Problem: {question}
    {instruction}
    Solution:

(the instruction line is left out when `instruction` is empty). The instruction asks for the final answer in
\\boxed{}, which is what `rewards.math` extracts first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

from megatron_s2d.data.types import Problem
from megatron_s2d.errors import S2DError

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Problem: {question}\n{instruction}\nSolution:"
PLAIN_TEMPLATE_NO_INSTRUCTION = "Problem: {question}\nSolution:"
_warned_no_template: set[str] = set()


def user_message(problem: Problem, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The user turn: the question, then the instruction after a blank line (no instruction if empty)."""
    question = problem.prompt.strip()
    return f"{question}\n\n{instruction}" if instruction else question


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer, problem: Problem, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """Prompt string for `problem` (see module docstring). tokenizer: a transformers tokenizer."""
    if not isinstance(problem, Problem):
        raise S2DError(f"build_prompt: expected a Problem, got {type(problem).__name__}")
    if has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message(problem, instruction)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        if not isinstance(text, str):
            raise S2DError(
                f"build_prompt: apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
            )
        return text
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if name not in _warned_no_template:
        _warned_no_template.add(name)
        warnings.warn(
            f"tokenizer '{name}' has no chat template; using the plain prompt template "
            f"{PLAIN_TEMPLATE!r} (set tokenizer.chat_template to use a chat format)",
            stacklevel=2,
        )
    if not instruction:
        return PLAIN_TEMPLATE_NO_INSTRUCTION.format(question=problem.prompt.strip())
    return PLAIN_TEMPLATE.format(question=problem.prompt.strip(), instruction=instruction)


def build_prompts(tokenizer, problems: Iterable[Problem], instruction: str = DEFAULT_INSTRUCTION) -> list[str]:
    """`build_prompt` for each problem, in order."""
    return [build_prompt(tokenizer, p, instruction) for p in problems]


def encode_prompt(tokenizer, problem: Problem, instruction: str | None = None) -> list[int]:
    """Token ids of a problem's prompt (chat template + instruction), without special tokens added twice."""
    text = build_prompt(tokenizer, problem, instruction or DEFAULT_INSTRUCTION)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
