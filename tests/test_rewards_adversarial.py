"""Hostile model output and misbehaving workers (rewards.sandbox, rewards.math).

Every item must come back with a status within its timeout (plus kill/respawn
slack), nothing in the output is ever executed, and a hung or dead worker is
replaced without losing the other results.
"""
import ctypes
import os
import threading
import time

import pytest

from rewards.math import Verdict, check_answer, verify_pair, warm_up
from rewards.sandbox import WorkerPool, in_worker

TIMEOUT = 2.0
SLACK = 1.5  # kill + bookkeeping on a busy 2-core machine


def _job(item):
    """A test workload: each kind misbehaves in its own way."""
    kind, arg = item
    if kind == "echo":
        return arg
    if kind == "sleep":
        time.sleep(arg)
        return arg
    if kind == "raise":
        raise ValueError(arg)
    if kind == "exit":
        os._exit(arg)
    if kind == "segfault":
        ctypes.string_at(0)
    if kind == "alloc_mb":
        return len(bytearray(arg * 1024 * 1024))
    if kind == "pid":
        return os.getpid()
    if kind == "in_worker":
        return in_worker()
    if kind == "unpicklable":
        return lambda: arg
    raise AssertionError(kind)


def _code_strings(marker):
    touch = f"__import__('os').system('touch {marker}')"
    return [
        touch,
        f'eval("{touch}")',
        f"exec(\"import os; os.system('touch {marker}')\")",
        f"lambda: {touch}",
        f"(lambda: {touch})()",
        "().__class__.__bases__[0].__subclasses__()",
        f"open('{marker}', 'w').write('x')",
        f"compile('{touch}', 's', 'exec')",
        f"__builtins__.__dict__['exec']('{touch}')",
        f"getattr(__import__('os'), 'system')('touch {marker}')",
    ]


def _hostile(marker):
    """(completion, gold) pairs none of which may count as correct."""
    deep = 5000
    items = [
        (r"\boxed{" + "(" * deep + "1" + ")" * deep + "}", "1"),
        (r"\boxed{" + "{" * deep + "1" + "}" * deep + "}", "1"),
        (r"\boxed{" + r"\frac{1}{" * deep + "2" + "}" * deep + "}", "1"),
        (r"\boxed{" + "(" * deep + "}", "1"),
        (r"\boxed{9^{9^{9^{9}}}}", "2"),
        (r"\boxed{10^{10^{10^{10}}}}", "2"),
        (r"\boxed{(10^{100})!}", "2"),
        ("word " * 200_000, "42"),  # 1 MB, no answer
        (r"\boxed{" + "1+" * 500_000 + "1}", "2"),  # 1 MB answer
        ("\\boxed{" * 150_000, "2"),  # 1 MB of unclosed boxes
        ("Answer: 1" + " " * 1_000_000 + "x", "2"),  # 1 MB of blanks on the answer line
        (r"\boxed{\frac{", "2"),
        (r"\boxed{\sqrt{", "2"),
        (r"\boxed{\frac{1}{2}", "2"),
        (r"\boxed{}}}}", "2"),
        (r"\boxed{\left( x \right}", "2"),
        (r"\boxed{\begin{pmatrix} 1 & 2}", "2"),
        (r"\boxed{$$$$\\}", "2"),
    ]
    for code in _code_strings(marker):
        items += [(rf"\boxed{{{code}}}", "2"), (f"Answer: {code}", "2"), (f"The final answer is {code}", code)]
    return items


def _normal():
    """(completion, gold, status) pairs that must still be right after the hostile ones."""
    return [(r"\boxed{\frac{1}{2}}", "0.5", "correct"), (r"\boxed{3}", "2", "incorrect"),
            ("Answer: 7", "7", "correct"), (r"\boxed{\text{Paris}}", "Paris", "correct")]


@pytest.mark.slow
def test_hostile_batch(tmp_path):
    marker = tmp_path / "PWNED_x"
    hostile, normal = _hostile(marker), _normal()
    # normal items go after every hanging one and at the end, so they meet replaced workers
    items = hostile[:4] + [n[:2] for n in normal] + hostile[4:] + [n[:2] for n in normal]
    seen = []
    with WorkerPool(verify_pair, workers=2, timeout=TIMEOUT, initializer=warm_up) as pool:
        outcomes = pool.map(items, on_result=lambda i, o: seen.append(i))
    assert sorted(seen) == list(range(len(items)))
    assert not marker.exists() and not os.path.exists("/tmp/PWNED_x")
    for (text, gold), out in zip(items, outcomes):
        assert out.status in ("ok", "timeout"), (text[:80], out)
        assert out.seconds < TIMEOUT + SLACK, (text[:80], out)
        if out.status == "ok":
            assert isinstance(out.value, Verdict)
    statuses = [o.status for o in outcomes]
    assert "timeout" in statuses  # the giant exponents really hang math-verify
    expected = [n[2] for n in normal]
    got = [o.value.status for o in outcomes[4:8]] + [o.value.status for o in outcomes[-4:]]
    assert got == expected * 2
    hostile_out = outcomes[:4] + outcomes[8:-4]
    assert not any(o.status == "ok" and o.value.correct for o in hostile_out)


@pytest.mark.slow
def test_pool_survives_misbehaving_items():
    items = [("echo", 1), ("raise", "boom"), ("exit", 3), ("segfault", None), ("sleep", 60),
             ("alloc_mb", 4096), ("unpicklable", 0), ("echo", 2)]
    with WorkerPool(_job, workers=2, timeout=TIMEOUT, memory_mb=1024) as pool:
        out = pool.map(items)
        again = pool.map([("echo", 3), ("in_worker", None)])
    assert [o.status for o in out] == ["ok", "error", "error", "error", "timeout", "error", "error", "ok"]
    assert out[0].value == 1 and out[-1].value == 2
    assert out[1].error == "ValueError: boom"
    assert "exit code 3" in out[2].error
    assert "died" in out[3].error
    assert TIMEOUT <= out[4].seconds < TIMEOUT + SLACK
    assert "MemoryError" in out[5].error  # the address-space cap, not the machine, stopped it
    assert "cannot send result" in out[6].error
    assert [o.value for o in again] == [3, True]
    assert not in_worker()


def test_hung_worker_is_replaced_when_used_from_a_thread():
    pool = WorkerPool(_job, workers=1, timeout=TIMEOUT)
    runs = []

    def work():  # the RL trainer scores in a background thread
        runs.append(pool.map([("pid", None)]))
        runs.append(pool.map([("echo", "a"), ("sleep", 60), ("pid", None), ("echo", "b")], timeout=1.0))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    pool.close()
    (before,), (a, hung, after, b) = runs
    assert [a.status, hung.status, after.status, b.status] == ["ok", "timeout", "ok", "ok"]
    assert after.value != before.value  # a fresh process took the hung one's place
    assert (a.value, b.value) == ("a", "b")
    with pytest.raises(RuntimeError, match="closed"):
        pool.map([("echo", 1)])


def test_check_answer_from_a_thread_and_after_a_hang():
    result = {}

    def score():
        result["ok"] = check_answer(r"\boxed{\frac{1}{2}}", "0.5")
        result["hang"] = check_answer(r"\boxed{9^{9^{9^{9}}}}", "2", timeout=1.0)
        result["after"] = check_answer(r"\boxed{x=2}", "2")

    thread = threading.Thread(target=score)
    thread.start()
    thread.join()
    assert result == {"ok": Verdict("correct", r"\frac{1}{2}"), "hang": Verdict("timeout"),
                      "after": Verdict("correct", "x=2")}
