"""Helpers: small rows in the real hub schemas (DAPO-Math-17k, hendrycks MATH, MATH-500, AIME 2024, project schema)."""

import json

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


def dapo_row(i: int, question: str, answer: str) -> dict:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + question + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": f"uuid-{i}"},
    }


def math_row(question: str, solution: str, level: str = "Level 3", typ: str = "Algebra") -> dict:
    return {"problem": question, "level": level, "type": typ, "solution": solution}


def math500_row(i: int, question: str, answer: str) -> dict:
    return {
        "problem": question,
        "solution": f"... so \\boxed{{{answer}}}",
        "answer": answer,
        "subject": "Algebra",
        "level": 2,
        "unique_id": f"test/algebra/{i}.json",
    }


def aime_row(i: int, question: str, answer: str) -> dict:
    return {"id": 60 + i, "problem": question, "solution": "...", "answer": answer, "url": "https://x", "year": "2024"}


def write_jsonl(path, rows, raw_lines=()):
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path
