"""lm-eval's Hendrycks MATH grader: the LAST ``\\boxed{}`` of a response, string-equal to the gold after a fixed
normalisation. The grader the authors' public OPD code uses (``../shared/reviews/peer_survey.md``: HJSang/
OPSD_OnPolicyDistillation ``src/rewards/math_reward.py`` calls lm-eval's ``is_equiv`` on the last box), so numbers
scored with it compare with theirs; math-verify (``rewards.math``, the default) is stricter on some forms and more
lenient on many (see ``tests/unit/rewards/test_grader_agrees.py`` for where they differ).

    >>> hendrycks_grade("so the area is \\boxed{\\dfrac12}.", "\\frac{1}{2}")
    (1.0, 'correct')
    >>> hendrycks_grade("The answer is 4.", "4")           # no box: no answer (no fallback)
    (0.0, 'no_answer')

Written by us from the definition in lm-evaluation-harness (commit 4e7e0d47, ``lm_eval/tasks/hendrycks_math/
utils.py``; the same functions are in ``lm_eval/tasks/minerva_math/utils.py:99-140``). Line numbers below are of
``hendrycks_math/utils.py`` at that commit. Behaviour is the reference's, including its failure modes: where the
reference raises inside ``strip_string`` (two ``\\text{ }`` units, a bare ``\\sqrt`` / ``\\frac`` at the end, a
single ``/`` between non-integers), ``is_equiv`` falls back to comparing the raw strings (utils.py:43-50), and so do we.
One deliberate difference: ``last_boxed_only_string`` finds ``\\fbox{..}`` (utils.py:71-74) but the reference's
``remove_boxed`` asserts a ``\\boxed{`` prefix (utils.py:59-62), so an ``\\fbox`` answer raises there and scores 0 in
the callers that catch it; we take the ``\\fbox`` content, as the extraction evidently intends (models rarely write
``\\fbox``).

Graded in the calling process, not in the killable worker pool that math-verify needs (``rewards.pool``): every step
is a linear pass of ``str.find`` / ``split`` / ``replace`` / one brace-counting scan over the response (no regular
expression, no parser, no sympy), so the cost is bounded by the response length, which the generation budget bounds
(``tests/unit/rewards/test_hendrycks.py`` grades 1-MB adversarial responses in well under a second each).
"""

from __future__ import annotations


class _NotNormalisable(Exception):
    """Raised where the reference's ``strip_string`` raises (an AssertionError, IndexError or ValueError there):
    ``is_equiv`` then compares the raw strings."""


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``) of ``text`` with its command, braces balanced, else None
    (utils.py:67-94). If ``"\\boxed "`` (with a space) occurs anywhere, the answer is what follows its last
    occurrence up to the next ``$``, whatever boxes come later (utils.py:69-70). Braces are counted from the
    command on, escapes included (``\\{`` counts, as in the reference); an unbalanced last box is no answer (no
    fall back to an earlier box)."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


def remove_boxed(box: str) -> str | None:
    """The content of a box ``last_boxed_only_string`` returned (utils.py:53-64); None where the reference's
    asserts fail (the command is not directly followed by ``{``, e.g. ``\\boxed\\n{3}``). ``\\fbox{x}`` gives x
    (the reference asserts; see the module docstring)."""
    if "\\boxed " in box:
        return box[len("\\boxed "):] if box.startswith("\\boxed ") else None
    for left in ("\\boxed{", "\\fbox{"):
        if box.startswith(left) and box.endswith("}"):
            return box[len(left):-1]
    return None


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``, ``\\fracab`` -> ``\\frac{a}{b}``
    (one character each; utils.py:97-126). A ``\\frac`` followed by one non-brace character leaves the whole string
    as it was; a ``\\frac`` followed by nothing raises in the reference."""
    parts = s.split("\\frac")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise _NotNormalisable("\\frac at the end")  # utils.py:104 indexes an empty string
        out.append("\\frac")
        if part[0] == "{":
            out.append(part)
        elif len(part) < 2:
            return s  # utils.py:107-110
        elif part[1] != "{":
            out.append("{" + part[0] + "}{" + part[1] + "}" + part[2:])
        else:
            out.append("{" + part[0] + "}" + part[1:])
    return "".join(out)


def _fix_a_slash_b(s: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are Python integers written canonically (utils.py:129-141).
    One ``/`` between sides that ``int()`` refuses raises in the reference (its ``except`` catches only
    AssertionError)."""
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError as e:
        raise _NotNormalisable("a/b with non-integer sides") from e
    if s != f"{a}/{b}":
        return s  # e.g. "+3/4", "03/4"
    return "\\frac{" + str(a) + "}{" + str(b) + "}"


def _remove_right_units(s: str) -> str:
    """Everything before ``\\text{ `` (a unit; utils.py:144-151); two of them raise in the reference."""
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _NotNormalisable("two \\text{ } units")
    return parts[0]


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (one character; utils.py:154-166); a ``\\sqrt`` followed by nothing (at the end,
    or right before another ``\\sqrt``) raises in the reference."""
    parts = s.split("\\sqrt")
    out = [parts[0]]
    for part in parts[1:]:
        if not part:
            raise _NotNormalisable("\\sqrt with no argument")
        out.append("\\sqrt" + part if part[0] == "{" else "\\sqrt{" + part[0] + "}" + part[1:])
    return "".join(out)


def strip_string(s: str) -> str:
    """The reference's normalisation, in its order (utils.py:169-231). Raises ``_NotNormalisable`` where it raises."""
    s = s.replace("\n", "")  # linebreaks
    s = s.replace("\\!", "")  # inverse spaces
    s = s.replace("\\\\", "\\")  # \\ -> \
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")  # degrees
    s = s.replace("\\$", "")  # dollars
    s = _remove_right_units(s)
    s = s.replace("\\%", "")  # percentage (utils.py:198-199 replace the same two characters twice)
    s = s.replace(" .", " 0.").replace("{.", "{0.")  # " .5" -> " 0.5", "{.5" -> "{0.5"
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 3" -> " 3" (a left side of at most 2 characters, spaces count)
        s = sides[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str | None, b: str | None) -> bool:
    """Equal after ``strip_string`` (utils.py:36-50); if either cannot be normalised, equal as raw strings. None
    (no answer) equals only None."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return strip_string(a) == strip_string(b)
    except _NotNormalisable:
        return a == b


def hendrycks_grade(response: str, gold: str) -> tuple[float, str]:
    """(1.0 or 0.0, outcome) of ``response`` against the gold answer text (a bare expression): "correct", "wrong",
    or "no_answer" (no last box, or one the reference cannot unwrap)."""
    box = last_boxed_only_string(response)
    answer = remove_boxed(box) if box is not None else None
    if answer is None:
        return 0.0, "no_answer"
    return (1.0, "correct") if is_equiv(answer, gold) else (0.0, "wrong")
