"""Cheap pre-checks on a response before any parser sees it, and a cheap final-answer guess they use.

The grade itself comes from math-verify's own extraction, in a worker (`_worker.compare`); what is here only decides
which responses are too dangerous to hand to a parser at all (`precheck_response`).

Everything here is pure Python on bounded strings (no sympy, no math-verify), so it cannot hang and runs in the
calling process. The expensive, hang-prone comparison lives in `_worker.py` behind a killable process pool.

The guess (`extract_answer`), applied to the last `RESPONSE_TAIL_CHARS` characters of the response only:
1. If the tail contains a `\\boxed` or `\\fbox` command, the answer is the content of the LAST top-level one
   (balanced braces; `\\{`/`\\}` escapes do not count; `\\boxed 5` without braces takes the next token).
   If that last box is unbalanced (e.g. a truncated response) there is NO answer: we do not fall back to an earlier
   box or to text, because an earlier box is usually an intermediate result.
2. Otherwise (no box command at all), the text after the last "answer is" / "answer:" (case-insensitive, so also
   "The final answer is", "**Answer:**") up to the end of that line, with `$...$`, `\\(...\\)`, `\\[...\\]`,
   markdown `*`, and a trailing period stripped.
3. Otherwise the last plain ASCII number (`-12`, `3.5`, `7/8`) in the final non-empty line, if that line is at
   most `MAX_FINAL_LINE_CHARS` long (a wall of text, e.g. the cut-off middle of a huge box, is not an answer line).
4. Otherwise no answer.

Pre-checks (`precheck_answer`): an extracted answer longer than `MAX_ANSWER_CHARS`, with brace nesting deeper than
`MAX_BRACE_DEPTH`, or containing non-ASCII characters outside a small whitelist of maths symbols (this rejects
fullwidth digits and Cyrillic/Greek look-alikes of Latin letters) is scored 0 without parsing.
"""

from __future__ import annotations

import re

RESPONSE_TAIL_CHARS = 4096
"""Only the last this-many characters of a response are searched for the final answer."""
MAX_ANSWER_CHARS = 512
"""Extracted answers longer than this are rejected (score 0) before parsing."""
MAX_FINAL_LINE_CHARS = 300
"""The last-number fallback only reads a final line up to this long."""
MAX_BRACE_DEPTH = 24
"""Extracted answers whose `{}` nesting exceeds this are rejected before parsing (deep `\\frac` towers)."""

# Non-ASCII characters a genuine answer may contain. Everything else (fullwidth forms, Cyrillic, Greek capitals that
# look like Latin letters, zero-width characters, ...) makes the answer invalid.
ALLOWED_NON_ASCII = frozenset("παβγδεθλμσφωΔΘΦΩΣΠ√∞°×÷·−±≤≥≠∪∩∈∉⊂⊆ℝℤℕℚ′″…")
_UNICODE_SPACES = dict.fromkeys(map(ord, "\u00a0\u2009\u200a\u202f\u2002\u2003\u3000"), " ")

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_ANCHOR = re.compile(r"answer\s*(?:is\b|:)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?", re.ASCII)


def _match_brace_group(text: str, start: int) -> int | None:
    """Index just past the `}` closing the group that opens at `text[start] == "{"`, or None if unbalanced."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":  # `\{`, `\}` and `\\` are escapes, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _parse_box_at(text: str, cmd_end: int) -> tuple[str | None, int]:
    """Parse the argument of a box command ending at `cmd_end`. Returns (content or None if unbalanced, end)."""
    i = cmd_end
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        end = _match_brace_group(text, i)
        if end is None:
            return None, len(text)
        return text[i + 1 : end - 1], end
    # `\boxed 5`: the next whitespace/`$`-delimited token
    m = re.match(r"[^\s$]+", text[i:])
    if m is None:
        return None, len(text)
    return m.group(0), i + m.end()


def last_boxed(text: str) -> tuple[bool, str | None]:
    """Content of the last top-level `\\boxed{}`/`\\fbox{}` in `text`.

    Returns (found_any_box_command, content). content is None when there is no box or the last one is unbalanced.
    """
    pos = 0
    found = False
    content: str | None = None
    while True:
        m = _BOX_COMMAND.search(text, pos)
        if m is None:
            return found, content
        found = True
        content, pos = _parse_box_at(text, m.end())


def _strip_delimiters(ans: str) -> str:
    ans = ans.strip().strip("*").strip()
    ans = ans.rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(left) and ans.endswith(right) and len(ans) >= len(left) + len(right):
            ans = ans[len(left) : len(ans) - len(right)].strip()
            break
    return ans.strip().rstrip(".").strip()


def _fallback_answer(tail: str) -> str | None:
    anchors = list(_ANSWER_ANCHOR.finditer(tail))
    if anchors:
        rest = tail[anchors[-1].end() :]
        line = rest.lstrip(" \t*:").split("\n", 1)[0]
        ans = _strip_delimiters(line)
        if ans:
            return ans
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    if not lines or len(lines[-1]) > MAX_FINAL_LINE_CHARS:
        return None
    numbers = _NUMBER.findall(lines[-1])
    return numbers[-1] if numbers else None


def extract_answer(response: object) -> str | None:
    """The final answer in `response` per the module rule, or None. Non-string input gives None."""
    if not isinstance(response, str) or not response:
        return None
    tail = response[-RESPONSE_TAIL_CHARS:]
    found_box, boxed = last_boxed(tail)
    if found_box:
        return boxed.strip() if boxed is not None and boxed.strip() else None
    return _fallback_answer(tail)


def brace_depth(text: str) -> int:
    """Maximum `{}` nesting depth of `text` (escaped braces ignored)."""
    depth = best = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
            best = max(best, depth)
        elif ch == "}":
            depth -= 1
        i += 1
    return best


def precheck_answer(answer: str) -> str | None:
    """Reason the answer is rejected without parsing, or None if it may go to the parser."""
    if len(answer) > MAX_ANSWER_CHARS:
        return f"answer longer than {MAX_ANSWER_CHARS} chars"
    if brace_depth(answer) > MAX_BRACE_DEPTH:
        return f"brace nesting deeper than {MAX_BRACE_DEPTH}"
    bad = [ch for ch in answer if ord(ch) > 127 and ch not in ALLOWED_NON_ASCII]
    if bad:
        return f"non-ASCII character {bad[0]!r} (U+{ord(bad[0]):04X}) outside the maths whitelist"
    return None


def normalize_answer_text(text: str) -> str:
    """Whitespace-normalised answer text with outer `$`/`\\(`/`\\[` delimiters removed (for exact-match checks)."""
    text = text.translate(_UNICODE_SPACES)
    return " ".join(_strip_delimiters(text).split())


def gold_answer_text(gold: str) -> str:
    """The gold as the grader hands it to math-verify. One `\\boxed{}`: that box's content; no box: the text with
    its delimiters stripped. A gold written as several boxes (`\\boxed{1}\\boxed{2}`, `\\boxed{2}, \\boxed{3}`,
    `\\(\\boxed{1}\\) and \\(\\boxed{-2}\\)`) is a set: it is kept whole, boxes included (whitespace
    normalised), and math-verify reads the boxes together, as it does when it parses such a gold itself
    (`_worker._parse_gold`); the last box alone would be one element of the set."""
    text = gold.strip()
    if is_box_set(text):
        return " ".join(text.translate(_UNICODE_SPACES).split())
    found, boxed = last_boxed(text)
    if found and boxed is not None:
        text = boxed
    return normalize_answer_text(text)


def all_boxed(text: str) -> list[str]:
    """Contents of every balanced top-level `\\boxed{}` / `\\fbox{}` of `text`, in order."""
    out, pos = [], 0
    while True:
        m = _BOX_COMMAND.search(text, pos)
        if m is None:
            return out
        content, pos = _parse_box_at(text, m.end())
        if content is not None:
            out.append(content)


def is_box_set(text: str) -> bool:
    """Whether `text` holds several balanced top-level boxes: a gold written that way is a set (`gold_answer_text`)."""
    return len(all_boxed(text)) >= 2


def precheck_response(tail: str) -> str | None:
    """Reason a response tail is rejected before any parser sees it, or None. The tail's `{}` nesting is bounded;
    every boxed answer, and the cheap final-answer guess of `extract_answer`, must pass `precheck_answer` (length,
    nesting, look-alike characters): those are the spans math-verify's extraction reads first."""
    if brace_depth(tail) > MAX_BRACE_DEPTH:
        return f"brace nesting deeper than {MAX_BRACE_DEPTH}"
    guess = extract_answer(tail)
    for span in all_boxed(tail) + ([guess] if guess else []):
        reason = precheck_answer(span)
        if reason is not None:
            return reason
    return None


def response_tail(response: str) -> str:
    """The part of a response that is graded: its last `RESPONSE_TAIL_CHARS` characters, starting after the last
    `}` that closes a group opened before them (so the tail never begins inside a brace group: the cut-off middle of
    a giant expression is not read as an answer; a normal final answer after it is kept whole)."""
    tail = response[-RESPONSE_TAIL_CHARS:]
    if len(tail) == len(response):
        return tail
    depth, cut, i = 0, 0, 0
    while i < len(tail):
        ch = tail[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:  # closes a group that opened before the tail
                depth, cut = 0, i + 1
        i += 1
    return tail[cut:]
