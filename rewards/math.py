"""Final-answer extraction and math equivalence: the R_acc_raw of Phi-4-reasoning-plus.

Phi-4-reasoning-plus (arXiv 2504.21318; docs/recipes.md §2): the answer is taken from
the last `\\boxed{}` and checked for mathematical equivalence with the ground truth
(math-verify). Model output is untrusted: extraction is linear-time and evaluates
nothing, math-verify only ever sees the extracted answer (never raw text through eval/sympify), and `check_answer`
runs the check in a killable process (rewards.sandbox) because math-verify's own
SIGALRM timeout does nothing off the main thread. A gold answer that cannot be
parsed is "bad_gold", never correct.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import re
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, get_args

from math_verify import LatexExtractionConfig, parse, verify

from rewards.sandbox import WorkerPool, in_worker

Status = Literal["correct", "incorrect", "no_answer", "bad_gold", "timeout"]

# Past these sizes an answer is not parsed (the LaTeX parser's cost grows with every level
# of parenthesis nesting); both grow with the gold so a long gold still fits.
MAX_ANSWER_CHARS = 1000
MAX_DEPTH = 12

# LaTeX only: math-verify's plain-expression target falls back to any bare number in
# the string, so "\begin{pmatrix} 1 & 2" would count as the answer 2.
_MATH_TARGETS = (LatexExtractionConfig(),)
log = logging.getLogger(__name__)

# We disable math-verify's SIGALRM timeouts on purpose (the worker is the timeout), so
# its "timeout is disabled" warning is noise here.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(lambda rec: "Timeout is disabled" not in rec.getMessage())


@dataclass(frozen=True)
class Verdict:
    status: Status
    answer: str | None = None  # the extracted final answer, when there was one

    @property
    def correct(self) -> bool:
        return self.status == "correct"


# ---------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.S)  # an escaped char is skipped whole: \{ is no brace
_ANSWER_MARK = re.compile(r"\bfinal answer is\b\s*:?|\banswer(?:\*\*)?\s*:", re.I)
_REST_OF_LINE = re.compile(r"(?:\*\*)?[ \t]*\n?[ \t]*(.*)")  # the answer may start on the next line
_HOPE = "i hope it is correct"  # the tail of Minerva-style "The final answer is X. I hope it is correct."
_DOLLAR = re.compile(r"(?<!\\)\$")


def _closing_braces(text: str, start: int) -> dict[int, int]:
    """Map each `{` at or after `start` to its matching `}`; one pass."""
    close, stack = {}, []
    for m in _BRACE_TOKEN.finditer(text, start):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            close[stack.pop()] = m.start()
    return close


# What may stand between the boxes of one final answer: "\\boxed{1}, \\boxed{2} and x = \\boxed{3}".
_BETWEEN_BOXES = re.compile(r"(?:\s|[,;&$]|\\quad|\\qquad|\\text\{\s*(?:and|or)?\s*\}|\b(?:and|or)\b|\b[a-zA-Z]\s*=)*")


def _final_boxes(text: str) -> str | None:
    """The content of the last top-level box, or of the run of boxes it ends, joined by ", ".

    A solution set written as several boxes is one answer: `\\boxed{(1, 2)}, \\boxed{(2, 1)}`
    gives "(1, 2), (2, 1)". A box inside another is part of it.
    """
    boxes = [(m.start(), m.end() - 1) for m in _BOXED.finditer(text)]  # (start, index of its `{`)
    if not boxes:
        return None
    close = _closing_braces(text, boxes[0][1])
    top, outer_end = [], -1
    for start, brace in boxes:  # in order of position; matched braces nest
        if brace in close and start > outer_end:
            top.append((start, brace, close[brace]))
            outer_end = close[brace]
    if not top:
        return None
    run = [top[-1]]  # from the last box backwards
    for prev in reversed(top[:-1]):
        gap = run[-1][0] - prev[2] - 1
        if gap > 40 or not _BETWEEN_BOXES.fullmatch(text, prev[2] + 1, run[-1][0]):  # a long gap: not one answer
            break
        run.append(prev)
    return ", ".join(text[b + 1:e].strip() for _, b, e in reversed(run))


def _tidy(s: str) -> str:
    return s.strip().strip("*").strip().rstrip(".").rstrip()


def _answer_line(text: str) -> str | None:
    last = None
    for last in _ANSWER_MARK.finditer(text):  # the last marker: "Answer: The final answer is 7"
        pass
    if last is None:
        return None
    ans = _tidy(_DOLLAR.sub("", _REST_OF_LINE.match(text, last.end()).group(1)))
    if ans.lower().endswith(_HOPE):  # string ops, not a regex: a regex here backtracks on long blanks
        ans = _tidy(ans[: -len(_HOPE)])
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if ans.startswith(a) and ans.endswith(b):
            ans = ans[2:-2].strip()
    return ans


def extract_answer(text: str) -> str | None:
    """The final answer: the last `\\boxed{}`/`\\fbox{}` (with the boxes just before it that
    belong to the same answer), else an "Answer:" line, else None.

    >>> extract_answer(r"so $\\boxed{\\frac{1}{2}}$."), extract_answer(r"x = \\boxed{1} or \\boxed{2}")
    ('\\\\frac{1}{2}', '1, 2')
    """
    ans = _final_boxes(text)
    return (_answer_line(text) if ans is None else ans) or None


# ---------------------------------------------------------------- equivalence

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\b\s*")
_WORDS = re.compile(r"[^\W\d_]{2,}(?:[ '\-][^\W\d_]+)*")


def _normalize_text(s: str) -> str:
    s = _TEXT_MACRO.sub("", s)
    s = re.sub(r"[{}$*\\]", "", s)
    s = " ".join(s.split()).lower()
    return s.strip(" .,;:!?\"'")


def _text_gold(gold: str) -> str | None:
    """The normalised words when the gold is a word answer ("Paris", "yes"), else None.

    Without this, math-verify reads "Paris" as the product P*a*r*i*s.
    """
    bare = _TEXT_MACRO.sub("", gold)
    if "\\" in bare:  # any other LaTeX command (\pi, \infty) makes it maths
        return None
    text = _normalize_text(bare)
    return text if _WORDS.fullmatch(text) else None


_PYTHON_POWER = re.compile(r"\*\*")
_PYTHON_TIMES = re.compile(r"(?<![*\\])\*(?!\*)")
_UPRIGHT_E = re.compile(r"\\(?:mathrm|operatorname|text)\s*\{\s*e\s*\}")


def _as_latex(s: str) -> str:
    """Python-style maths (`x**2*y`, as sympy and generated data sets write it) as LaTeX, and an
    upright `\\mathrm{e}` as Euler's e. Only rewrites text: nothing is evaluated."""
    s = _UPRIGHT_E.sub("e", s)
    if "\\" not in s and "*" in s:
        s = _PYTHON_TIMES.sub(r" \\cdot ", _PYTHON_POWER.sub("^", s))
    return s


def _parse_math(s: str) -> list:
    # Wrapped in \boxed so math-verify takes the whole string as one LaTeX answer.
    return parse(f"\\boxed{{{_as_latex(s)}}}", extraction_config=_MATH_TARGETS, parsing_timeout=None)


_SPACED_THOUSANDS = re.compile(r"-?\d{1,3}(?:(?:\s|\\,|\\ |~)\d{3})+(?:\.\d+)?")
_COMMA_DECIMAL = re.compile(r"-?\d+,(?:\d{1,2}|\d{4,})")  # "1,22", "1000,99"; "1,000" is thousands


def readings(answer: str) -> list[str]:
    """The answer as written, then as a number in the other common notations.

    >>> readings("1 000"), readings("1000,99"), readings("1,000")
    (['1 000', '1000'], ['1000,99', '1000.99'], ['1,000'])
    """
    out = [answer]
    if _SPACED_THOUSANDS.fullmatch(answer):
        out.append(re.sub(r"\s|\\,|\\ |~", "", answer))
    if _COMMA_DECIMAL.fullmatch(answer):
        out.append(answer.replace(",", "."))
    return out


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple | None:
    gold = _DOLLAR.sub("", gold).strip()
    if not gold:
        return None
    words = _text_gold(gold)
    if words is not None:
        return (words,)
    parsed = _parse_math(gold)
    # Only a string back means math-verify failed to parse it: unusable as a gold.
    return tuple(parsed) if any(not isinstance(p, str) for p in parsed) else None


def parse_gold(gold: str) -> list | None:
    """The gold as math-verify objects, `[words]` for a word answer, None if unusable.

    Runs math-verify in-process without a timeout: gold answers come from data sets,
    not from the model.
    """
    parsed = _parse_gold(gold)
    return None if parsed is None else list(parsed)


def _depth(s: str) -> int:
    depth = top = 0
    for c in s:
        if c in "([{":
            depth += 1
            top = max(top, depth)
        elif c in ")]}":
            depth -= 1
    return top


def _too_big(answer: str, gold: str) -> bool:
    return len(answer) > max(MAX_ANSWER_CHARS, 4 * len(gold)) or _depth(answer) > max(MAX_DEPTH, 2 * _depth(gold))


def verify_answer(text: str, gold: str) -> Verdict:
    """Check a completion against the gold in-process, with no timeout.

    Call this only inside a pool worker; `check_answer` is the safe entry point.
    """
    parsed_gold = parse_gold(gold)
    if parsed_gold is None:
        return Verdict("bad_gold")
    answer = extract_answer(text)
    if answer is None:
        return Verdict("no_answer")
    if _too_big(answer, gold):
        return Verdict("incorrect", answer)
    if all(isinstance(g, str) for g in parsed_gold):  # a word answer
        ok = _normalize_text(answer) in parsed_gold
    else:  # gold first: math-verify is asymmetric (x=2 counts for a gold of 2)
        ok = any(verify(parsed_gold, _parse_math(a), timeout_seconds=None) for a in readings(answer))
    return Verdict("correct" if ok else "incorrect", answer)


def verify_pair(pair: tuple[str, str]) -> Verdict:
    """`verify_answer(text, gold)` for one `(text, gold)` item of a WorkerPool."""
    text, gold = pair
    return verify_answer(text, gold)


def warm_up() -> None:
    """Pay math-verify's first-call costs (LaTeX grammar, sympy caches) up front."""
    verify_answer(r"\boxed{x=\frac{1}{2}}", "0.5")


# ---------------------------------------------------------------- safe entry point

_skip: ContextVar[Status | None] = ContextVar("skip_verification", default=None)
_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


@contextlib.contextmanager
def skip_verification(status: Status = "timeout"):
    """Within this block (this thread/context) `check_answer` returns `Verdict(status)`.

    The batch scorer uses it to re-score a sample whose check hung, so the length and
    format parts of a composite reward are still computed.
    """
    if status not in get_args(Status):
        raise ValueError(f"skip_verification: unknown status {status!r}; expected one of {get_args(Status)}")
    token = _skip.set(status)
    try:
        yield
    finally:
        _skip.reset(token)


def _shared_pool() -> WorkerPool:
    global _pool
    if _pool is None:
        _pool = WorkerPool(verify_pair, workers=1, initializer=warm_up)
        atexit.register(_pool.close)
    return _pool


def check_answer(text: str, gold: str, timeout: float = 5.0) -> Verdict:
    """Verify with a hard wall-clock timeout; safe on any model output, from any thread.

    Inside a pool worker it runs inline (the enclosing pool is the timeout). Elsewhere
    it uses one shared worker process, replaced when it hangs. A check that hangs, or
    whose worker dies (out of memory, crash), gives `Verdict("timeout")`.
    """
    skipped = _skip.get()
    if skipped is not None:
        return Verdict(skipped)
    if in_worker():
        return verify_answer(text, gold)
    with _pool_lock:
        outcome = _shared_pool().map([(text, gold)], timeout=timeout)[0]
    if outcome.status == "ok":
        return outcome.value
    if outcome.status == "error":
        log.warning("answer check failed (%s); scored as timeout", outcome.error)
    return Verdict("timeout")
