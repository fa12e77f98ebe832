"""Built-in synthetic math problems with exact answers, seeded, at difficulty levels 0..5.

The demo and the tests have no public problem set to download, so this module makes
one: `generate_problems` draws seeded problems (exact answers, computed with integers
and `fractions.Fraction`) and `solution` gives the worked steps of each, which the
programmatic teacher in `distill.synthetic` turns into traces.

Levels (a 135M model learns 2-digit addition in minutes, so level 0 is opt-in):
  0 add2, sub2       2-digit column addition / subtraction (not in the default mix)
  1 add, sub         column addition with carries / subtraction with borrows
  2 mul, word_mul    2-3 digit multiplication by partial products; one-step stories
  3 expr, word_two   3-4 operand expressions with precedence; two-step stories
  4 linear           ax + b = c and ax + b = cx + d, integer solution
  5 fraction         + - * ÷ of two fractions, answer reduced ("19/12" or "3")

Held-out sets are disjoint by construction: one call draws distinct prompts, and
`generate_problems(exclude=...)` skips the prompts of sets already written (`reason
distill problems --eval-out` / `--exclude`). Do not n-gram-decontaminate synthetic sets against
each other: the story templates share long word runs by design.
"""
from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from math import gcd, lcm
from typing import Iterable

from reason.errors import UserError
from reason.records import Problem

Steps = list[str]

# ---------------------------------------------------------------- formatting

_PLACES = ["Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands"]
_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jon", "Kira", "Leo", "Maya", "Nora"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cards", "books", "shells", "coins", "beads", "stamps"]


def format_answer(value: Fraction | int) -> str:
    """Exact answer as math-verify parses it: "12", "-3", "19/12"."""
    value = Fraction(value)
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _signed(x: int) -> str:
    """` + 5` / ` - 5`, to write `7x - 12` instead of `7x + -12`."""
    return f" - {-x}" if x < 0 else f" + {x}"


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]  # ones first


def _number(rng: random.Random, min_digits: int, max_digits: int) -> int:
    d = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (d - 1), 10**d - 1)


# ---------------------------------------------------------------- level 1: columns

def _render_add(p: dict) -> tuple[str, Steps, Fraction]:
    a, b = p["a"], p["b"]
    da, db = _digits(a), _digits(b)
    steps, carry = ["Add column by column from the right, carrying tens."], 0
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        s = sum(terms)
        carry, digit = divmod(s, 10)
        expr = " + ".join(map(str, terms))
        tail = f" Write {digit}, carry {carry}." if carry else f" Write {digit}."
        steps.append(f"{_PLACES[i]}: {expr} = {s}." + tail if len(terms) > 1 else f"{_PLACES[i]}: {s}." + tail)
    if carry:
        steps.append(f"{_PLACES[max(len(da), len(db))]}: the carry {carry} is the leading digit.")
    steps.append(f"So {a} + {b} = {a + b}.")
    return f"What is {a} + {b}?", steps, Fraction(a + b)


def _render_sub(p: dict) -> tuple[str, Steps, Fraction]:
    a, b = p["a"], p["b"]  # a >= b
    da, db = _digits(a), _digits(b)
    steps, borrow = ["Subtract column by column from the right, borrowing when needed."], 0
    for i in range(len(da)):
        top, low = da[i], db[i] if i < len(db) else 0
        line = f"{_PLACES[i]}: "
        if borrow:
            line += f"{top} - 1 = {top - 1} after lending, "
            top -= 1
        borrow = int(top < low)
        if borrow:
            line += f"{top} - {low} needs a borrow: {top + 10} - {low} = {top + 10 - low}."
        else:
            line += f"{top} - {low} = {top - low}."
        steps.append(line)
    steps.append(f"So {a} - {b} = {a - b}.")
    return f"What is {a} - {b}?", steps, Fraction(a - b)


def _gen_add(rng: random.Random) -> dict:
    return {"a": _number(rng, 3, 5), "b": _number(rng, 3, 5)}


def _gen_sub(rng: random.Random) -> dict:
    a, b = _number(rng, 4, 5), _number(rng, 3, 5)
    return {"a": max(a, b), "b": min(a, b)}


def _gen_add2(rng: random.Random) -> dict:
    return {"a": rng.randint(10, 99), "b": rng.randint(10, 99)}


def _gen_sub2(rng: random.Random) -> dict:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"a": max(a, b), "b": min(a, b)}


# ---------------------------------------------------------------- level 2: products

def _times_digit(a: int, d: int) -> str:
    """`47 * 6 = 40 * 6 + 7 * 6 = 240 + 42 = 282`: only times-table facts and a sum."""
    parts = [(int(c) * 10**k) for k, c in enumerate(reversed(str(a))) if c != "0"][::-1]
    if len(parts) == 1:
        return f"{a} * {d} = {a * d}"
    split = " + ".join(f"{x} * {d}" for x in parts)
    products = " + ".join(str(x * d) for x in parts)
    return f"{a} * {d} = {split} = {products} = {a * d}"


def _mul_steps(a: int, b: int) -> Steps:
    tens, ones = divmod(b, 10)
    steps = [f"Split {b} into {tens * 10} + {ones}."] if ones and tens else []
    if ones:
        steps.append(_times_digit(a, ones) + ".")
    if tens:
        steps.append(_times_digit(a, tens) + f", so {a} * {tens * 10} = {a * tens * 10}.")
    if ones and tens:
        steps.append(f"Add the parts: {a * ones} + {a * tens * 10} = {a * b}.")
    steps.append(f"So {a} * {b} = {a * b}.")
    return steps


def _gen_mul(rng: random.Random) -> dict:
    return {"a": _number(rng, 2, 3), "b": rng.randint(12, 99)}


def _render_mul(p: dict) -> tuple[str, Steps, Fraction]:
    return f"What is {p['a']} * {p['b']}?", _mul_steps(p["a"], p["b"]), Fraction(p["a"] * p["b"])


def _gen_word_mul(rng: random.Random) -> dict:
    return {"name": rng.choice(_NAMES), "item": rng.choice(_ITEMS), "packs": rng.randint(12, 99),
            "each": rng.randint(12, 99)}


def _render_word_mul(p: dict) -> tuple[str, Steps, Fraction]:
    n, k, item, name = p["packs"], p["each"], p["item"], p["name"]
    prompt = (f"{name} buys {n} boxes of {item}. Each box holds {k} {item}. "
              f"How many {item} does {name} buy in total?")
    steps = [f"There are {n} boxes with {k} {item} in each, so multiply {n} by {k}."] + _mul_steps(n, k)
    steps.append(f"{name} buys {n * k}.")
    return prompt, steps, Fraction(n * k)


# ---------------------------------------------------------------- level 3: several steps

def _show(tokens: list) -> str:
    return " ".join(map(str, tokens)).replace("( ", "(").replace(" )", ")")


def _reduce_once(tokens: list) -> tuple[list, str]:
    """Apply the next operation by precedence; return the new tokens and the line saying it."""
    lo, hi = 0, len(tokens)
    if "(" in tokens:
        lo = tokens.index("(") + 1
        hi = tokens.index(")", lo)
    inner = tokens[lo:hi]
    ops = [i for i, t in enumerate(inner) if t == "*"] or [i for i, t in enumerate(inner) if t in ("+", "-")]
    i = ops[0]
    x, op, y = inner[i - 1], inner[i], inner[i + 1]
    z = x * y if op == "*" else x + y if op == "+" else x - y
    inner = inner[: i - 1] + [z] + inner[i + 2:]
    if lo and len(inner) == 1:  # a bracket holding one number is just that number
        lo, hi = lo - 1, hi + 1
    return tokens[:lo] + inner + tokens[hi:], f"{x} {op} {y} = {z}"


def _gen_expr(rng: random.Random) -> dict:
    nums = [rng.randint(2, 30) for _ in range(rng.randint(3, 4))]
    ops = [rng.choice("+-*") for _ in range(len(nums) - 1)]
    tokens: list = [nums[0]]
    for op, n in zip(ops, nums[1:]):
        tokens += [op, n]
    if rng.random() < 0.5:  # bracket one operation; keep its value positive so no "- -6" appears
        k = 2 * rng.randrange(len(ops))
        x, op, y = tokens[k:k + 3]
        if op == "-" and x <= y:  # swap, and make them differ
            x, y = y + 1, x
        tokens = tokens[:k] + ["(", x, op, y, ")"] + tokens[k + 3:]
    return {"tokens": tokens}


def _render_expr(p: dict) -> tuple[str, Steps, Fraction]:
    tokens = p["tokens"]
    steps = ["Brackets first, then multiplication, then addition and subtraction from left to right."]
    while len(tokens) > 1:
        tokens, line = _reduce_once(tokens)
        steps.append(f"{line}, so the expression becomes {_show(tokens)}." if len(tokens) > 1 else f"{line}.")
    return f"Evaluate {_show(p['tokens'])}.", steps, Fraction(tokens[0])


_WORD_TWO = ("spend", "bake", "read", "share")


def _gen_word_two(rng: random.Random) -> dict:
    p = {"form": rng.choice(_WORD_TWO), "name": rng.choice(_NAMES), "item": rng.choice(_ITEMS),
         "a": rng.randint(3, 9), "b": rng.randint(12, 60)}
    if p["form"] == "bake":  # c: cookies sold, fewer than were baked
        p["c"] = rng.randint(1, p["a"] * p["b"] - 1)
    elif p["form"] == "share":  # c: friends; bags * per bag must split evenly among them
        p["c"] = rng.randint(2, 6)
        p["a"] = p["c"] * rng.randint(1, 4)
    else:  # c: dollars left (spend) or extra pages (read)
        p["c"] = rng.randint(10, 300)
    return p


def _render_word_two(p: dict) -> tuple[str, Steps, Fraction]:
    name, item, a, b, c, form = p["name"], p["item"], p["a"], p["b"], p["c"], p["form"]
    ab = a * b
    if form == "spend":
        money = ab + c
        prompt = (f"{name} has {money} dollars and buys {a} games that cost {b} dollars each. "
                  f"How many dollars does {name} have left?")
        steps = [f"The games cost {a} * {b} = {ab} dollars.", f"{name} has {money} - {ab} = {c} dollars left."]
        return prompt, steps, Fraction(c)
    if form == "bake":
        prompt = (f"A baker makes {a} trays of {b} cookies and sells {c} of them. "
                  f"How many cookies are left?")
        steps = [f"The baker makes {a} * {b} = {ab} cookies.", f"{ab} - {c} = {ab - c} cookies are left."]
        return prompt, steps, Fraction(ab - c)
    if form == "read":
        prompt = (f"{name} reads {b} pages a day for {a} days, then reads {c} more pages. "
                  f"How many pages does {name} read in all?")
        steps = [f"In {a} days {name} reads {b} * {a} = {ab} pages.", f"Then {ab} + {c} = {ab + c} pages in all."]
        return prompt, steps, Fraction(ab + c)
    prompt = (f"{name} has {a} bags with {b} {item} in each bag and shares all the {item} equally "
              f"among {c} friends. How many {item} does each friend get?")
    steps = [f"There are {a} * {b} = {ab} {item}.", f"Each friend gets {ab} / {c} = {ab // c}."]
    return prompt, steps, Fraction(ab, c)


# ---------------------------------------------------------------- level 4: equations

def _gen_linear(rng: random.Random) -> dict:
    a, x, b = rng.randint(2, 12), rng.choice([v for v in range(-15, 16) if v]), rng.randint(-60, 60)
    c = rng.randint(1, a - 1) if rng.random() < 0.5 else 0  # 0: the one-sided form ax + b = d
    return {"a": a, "b": b, "c": c, "d": a * x + b - c * x}


def _side(coef: int, const: int) -> str:
    head = "x" if coef == 1 else f"{coef}x"
    return head if const == 0 else head + _signed(const)


def _render_linear(p: dict) -> tuple[str, Steps, Fraction]:
    a, b, c, d = p["a"], p["b"], p["c"], p["d"]
    k, x = a - c, Fraction(d - b, a - c)
    steps = []
    if c:
        steps.append(f"Subtract {_side(c, 0)} from both sides: {a}x - {_side(c, 0)} = {_side(k, 0)}, "
                     f"so {_side(k, b)} = {d}.")
    if b:
        verb = f"Subtract {b} from" if b > 0 else f"Add {-b} to"
        steps.append(f"{verb} both sides: {_side(k, 0)} = {d}{_signed(-b)} = {d - b}.")
    if k != 1:
        steps.append(f"Divide both sides by {k}: x = {d - b} / {k} = {format_answer(x)}.")
    steps.append(f"So x = {format_answer(x)}.")
    return f"Solve for x: {_side(a, b)} = {_side(c, d) if c else d}.", steps, x


# ---------------------------------------------------------------- level 5: fractions

def _gen_fraction(rng: random.Random) -> dict:
    def frac() -> list[int]:
        q = rng.randint(2, 12)
        return [rng.choice([n for n in range(1, q) if gcd(n, q) == 1]), q]

    x, y = frac(), frac()
    while y == x:
        y = frac()
    op = rng.choice("+-*÷")
    if op == "-" and Fraction(*x) < Fraction(*y):
        x, y = y, x
    return {"x": x, "op": op, "y": y}


def _render_fraction(p: dict) -> tuple[str, Steps, Fraction]:
    (a, b), op, (c, d) = p["x"], p["op"], p["y"]
    prompt = f"Compute {a}/{b} {op} {c}/{d}. Give the answer as a fraction in lowest terms."
    steps = []
    if op in "+-":
        m = lcm(b, d)
        x, y = a * m // b, c * m // d
        n, q = (x + y if op == "+" else x - y), m
        steps += [f"The least common multiple of {b} and {d} is {m}.", f"{a}/{b} = {x}/{m} and {c}/{d} = {y}/{m}.",
                  f"{x}/{m} {op} {y}/{m} = {n}/{m}."]
    else:
        if op == "÷":
            steps.append(f"Dividing by {c}/{d} is multiplying by {d}/{c}.")
            c, d = d, c
        n, q = a * c, b * d
        steps.append(f"Multiply tops and bottoms: ({a} * {c})/({b} * {d}) = {n}/{q}.")
    g, value = gcd(n, q), Fraction(n, q)
    steps.append(f"gcd({n}, {q}) = 1, so {n}/{q} is already in lowest terms." if g == 1
                 else f"gcd({n}, {q}) = {g}, so {n}/{q} = {format_answer(value)}.")
    steps.append(f"So the result is {format_answer(value)}.")
    return prompt, steps, value


# ---------------------------------------------------------------- the generator

KINDS = {  # kind -> (level, draw parameters, render prompt + steps + exact value)
    "add2": (0, _gen_add2, _render_add),
    "sub2": (0, _gen_sub2, _render_sub),
    "add": (1, _gen_add, _render_add),
    "sub": (1, _gen_sub, _render_sub),
    "mul": (2, _gen_mul, _render_mul),
    "word_mul": (2, _gen_word_mul, _render_word_mul),
    "expr": (3, _gen_expr, _render_expr),
    "word_two": (3, _gen_word_two, _render_word_two),
    "linear": (4, _gen_linear, _render_linear),
    "fraction": (5, _gen_fraction, _render_fraction),
}
LEVELS = sorted({lvl for lvl, _, _ in KINDS.values()})
DEFAULT_LEVELS = (1, 2, 3, 4, 5)  # level 0 only when asked for


def make_problem(kind: str, params: dict, source: str = "synthetic") -> Problem:
    """The Problem for one kind's parameters; its id is a hash of the prompt."""
    level, _, render = KINDS[kind]
    prompt, _, value = render(params)
    digest = hashlib.sha1(prompt.encode()).hexdigest()[:12]
    return Problem(id=f"{source}-{digest}", prompt=prompt, ground_truth=format_answer(value), source=source,
                   metadata={"kind": kind, "level": level, "params": params})


def generate_problems(n: int, seed: int, levels=DEFAULT_LEVELS, source: str = "synthetic",
                      exclude: Iterable[str] = ()) -> list[Problem]:
    """`n` distinct problems; each picks a level uniformly from `levels`, then a kind of it.

    Prompts in `exclude` (e.g. a held-out set's) are never drawn. Same seed -> same
    list; the first k of a longer list equal a run with n=k.
    """
    bad = [lvl for lvl in levels if lvl not in LEVELS]
    if bad or not levels:
        raise UserError(f"levels must be a non-empty subset of {LEVELS}, got {list(levels)}")
    kinds = {lvl: [k for k, (at, _, _) in KINDS.items() if at == lvl] for lvl in levels}
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    for _ in range(50 * n + 1000):  # every level has far more than n distinct prompts in practice
        if len(out) == n:
            return out
        kind = rng.choice(kinds[rng.choice(list(levels))])
        problem = make_problem(kind, KINDS[kind][1](rng), source)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            out.append(problem)
    raise UserError(f"only {len(out)} distinct problems found for levels {list(levels)}; asked for {n}")


def solution(problem: Problem) -> tuple[Steps, Fraction]:
    """The worked steps and exact value of a problem this module made."""
    kind, params = problem.metadata.get("kind"), problem.metadata.get("params")
    if kind not in KINDS or not isinstance(params, dict):
        raise UserError(f"problem {problem.id!r} was not made by the synthetic generator (no kind/params metadata)")
    _, steps, value = KINDS[kind][2](params)
    return steps, value


def regroupings(problem: Problem) -> int | None:
    """The carries (addition) or borrows (subtraction) the column method needs: what
    makes one sum harder than another at the same number of digits. None for other kinds.

    >>> regroupings(make_problem("add2", {"a": 74, "b": 27})), regroupings(make_problem("sub2", {"a": 43, "b": 12}))
    (2, 0)
    """
    if problem.metadata.get("kind") not in ("add", "sub", "add2", "sub2"):
        return None
    steps, _ = solution(problem)
    return sum(", carry " in s or "needs a borrow" in s for s in steps)
