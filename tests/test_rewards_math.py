"""Answer extraction and equivalence (rewards.math) on well-formed inputs."""
import pytest

from rewards.math import Verdict, check_answer, extract_answer, parse_gold, skip_verification, verify_answer

CASES = [
    # numbers, fractions, decimals
    (r"so $\boxed{0.5}$", r"\frac12", "correct"),
    (r"\boxed{\frac12}", "0.5", "correct"),
    (r"\boxed{\dfrac{3}{4}}", "0.75", "correct"),
    (r"\boxed{1/3}", r"\frac{1}{3}", "correct"),
    (r"\boxed{0.333}", r"\frac{1}{3}", "incorrect"),
    (r"\boxed{1,000}", "1000", "correct"),
    (r"\boxed{-3}", "3", "incorrect"),
    (r"\boxed{10\%}", "0.1", "correct"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", "correct"),
    (r"\boxed{\pi}", r"\pi", "correct"),
    (r"\boxed{3.14}", r"\pi", "incorrect"),
    (r"\boxed{\infty}", r"\infty", "correct"),
    # expressions
    (r"\boxed{2x+2}", "2(x+1)", "correct"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", "correct"),
    (r"\boxed{2x+1}", "2(x+1)", "incorrect"),
    # sets, tuples, intervals, matrices
    (r"\boxed{\{3,1,2\}}", r"\{1,2,3\}", "correct"),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", "incorrect"),
    (r"\boxed{(1, 2)}", "(1,2)", "correct"),
    (r"\boxed{(2,1)}", "(1,2)", "incorrect"),
    (r"\boxed{[0,1)}", "[0,1)", "correct"),
    (r"\boxed{[0,1]}", "[0,1)", "incorrect"),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", "correct"),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", "correct"),
    # equations
    (r"\boxed{x=2}", "2", "correct"),
    (r"\boxed{2}", "x=2", "correct"),
    (r"\boxed{x=3}", "2", "incorrect"),
    (r"\boxed{y = 2x + 1}", "y=2x+1", "correct"),
    # text answers: compared as words, never as products of symbols
    (r"\boxed{\text{Paris}}", "Paris", "correct"),
    (r"\boxed{paris}", r"\text{Paris}", "correct"),
    (r"\boxed{Pairs}", "Paris", "incorrect"),
    (r"\boxed{London}", "Paris", "incorrect"),
    (r"\boxed{\textbf{Yes}}", "yes", "correct"),
    (r"\boxed{no}", "yes", "incorrect"),
    (r"\boxed{No solution.}", "no solution", "correct"),
    (r"\boxed{\text{(C)}}", "C", "correct"),
    (r"\boxed{D}", "C", "incorrect"),
    # units and markup around a number
    (r"\boxed{5\text{ cm}}", "5", "correct"),
    # a malformed answer must not fall back to a number found inside it
    (r"\boxed{\begin{pmatrix} 1 & 2}", "2", "incorrect"),
    (r"\boxed{x \neq 2 \&}", "2", "incorrect"),
    # which answer counts
    (r"\boxed{1} at first, but finally \boxed{2}", "2", "correct"),
    (r"\boxed{2} at first, but finally \boxed{1}", "2", "incorrect"),
    ("Answer: 42", "42", "correct"),
    ("**Answer:** 42.", "42", "correct"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", "correct"),
    ("Final Answer: The final answer is 7", "7", "correct"),
    ("I think it is 5 but I am not sure.", "5", "no_answer"),
    (r"\boxed{}", "5", "no_answer"),
    ("", "5", "no_answer"),
    # unusable gold: skipped, never correct, whatever the completion says
    (r"\boxed{1}", "", "bad_gold"),
    (r"\boxed{1}", "   ", "bad_gold"),
    (r"\boxed{\frac{}", r"\frac{", "bad_gold"),
    ("no answer at all", r"\sqrt{", "bad_gold"),
]


@pytest.mark.parametrize("text,gold,status", CASES)
def test_verify_answer_table(text, gold, status):
    verdict = verify_answer(text, gold)
    assert verdict.status == status, (text, gold, verdict)
    assert verdict.correct == (status == "correct")


@pytest.mark.parametrize("text,answer", [
    (r"so $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{a{b{c}}d}", "a{b{c}}d"),  # nested braces
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not braces
    (r"\boxed{\boxed{3}}", r"\boxed{3}"),  # the outer box closes last
    (r"\fbox{7}", "7"),
    (r"\boxed {3}", "3"),
    (r"\boxed{1} then \boxed{ 2 }", "2"),
    (r"\boxed{x} and then \boxed{\sqrt{", "x"),  # an unclosed box does not count
    (r"\boxed{1", None),
    ("Answer:\n  5", "5"),
    ("answer: $x = 2$.", "x = 2"),
    (r"Answer: \(\frac{1}{2}\)", r"\frac{1}{2}"),
    ("Answer: 1\nmore text\nAnswer: 2", "2"),
    ("The final answer is: 12. I hope it is correct.", "12"),
    (r"Answer: 1 but \boxed{2}", "2"),  # a box beats an answer line
    ("Answer:", None),
    ("nothing here", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_parse_gold():
    assert parse_gold("Paris") == ["paris"]
    parsed = parse_gold(r"\frac12")
    assert parsed is not None and any(not isinstance(p, str) for p in parsed)
    assert parse_gold(r"\infty") != ["infty"]  # a LaTeX command is maths, not a word
    for bad in ["", "  ", r"\frac{", "$$"]:
        assert parse_gold(bad) is None, bad


def test_skip_verification():
    with skip_verification():
        assert check_answer(r"\boxed{2}", "2") == Verdict("timeout")
        with skip_verification("no_answer"):
            assert check_answer(r"\boxed{2}", "2") == Verdict("no_answer")
        assert check_answer(r"\boxed{2}", "2") == Verdict("timeout")
    with pytest.raises(ValueError, match="unknown status"):
        with skip_verification("skipped"):
            pass


def test_check_answer_in_a_process():
    assert check_answer(r"\boxed{2x+2}", "2(x+1)") == Verdict("correct", "2x+2")
    assert check_answer(r"\boxed{3}", "2") == Verdict("incorrect", "3")
    assert check_answer(r"\boxed{1}", "").status == "bad_gold"
