"""Teacher trace generation: the retrying client, resume after a kill.

The fault tests talk to a real HTTP server on 127.0.0.1 (stdlib, in a thread) that
speaks the chat-completions shape and fails on purpose: 500s, 429s with Retry-After,
dropped connections, hangs past the client timeout, and short answers to `n`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill.cli import app
from distill.generate import GenerateConfig, generate_traces, plan_jobs, request_seed
from reason.synthetic import generate_problems
from distill.teacher import TeacherError, backoff_delay, parse_choices, parse_retry_after
from reason.chat import ChatConfig, format_response
from reason.records import Problem, Trace, read_jsonl, write_jsonl
from rewards.format import parse_think

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- teacher client pieces

def test_backoff_delay_doubles_caps_and_jitters():
    assert [backoff_delay(a, 0.5, 3.0, 0.0) for a in range(5)] == [0.25, 0.5, 1.0, 1.5, 1.5]
    assert backoff_delay(2, 1.0, 60.0, 0.999999) == pytest.approx(4.0, rel=1e-5)


def test_parse_retry_after_seconds_and_http_date():
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("0.5", now) == 0.5
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None


def test_parse_choices_reads_both_reasoning_fields_in_index_order():
    data = {"choices": [
        {"index": 1, "message": {"content": "B", "reasoning": "rb"}, "finish_reason": "length"},
        {"index": 0, "message": {"content": "A", "reasoning_content": "ra"}, "finish_reason": "stop"},
        {"index": 2, "message": {"content": None}, "finish_reason": "stop"},
    ]}
    got = [(c.content, c.reasoning, c.finish_reason) for c in parse_choices(data)]
    assert got == [("A", "ra", "stop"), ("B", "rb", "length"), ("", None, "stop")]
    with pytest.raises(ValueError):
        parse_choices({"error": "x"})
    for bad in (["text"], [{"message": "hi"}], [{"index": "0", "message": {}}], [{"message": {"content": ["a"]}}],
                [{"message": {"content": "a"}, "finish_reason": 3}]):  # untrusted bodies: bad responses, not crashes
        with pytest.raises(ValueError):
            parse_choices({"choices": bad})


def test_plan_jobs_skips_done_pairs_and_chunks_by_n():
    ps = [Problem(id=i, prompt="q") for i in ("a", "b")]
    jobs = plan_jobs(ps, 5, {("a", 0), ("a", 3), ("b", 4)}, 2)
    assert [(p.id, s) for p, s in jobs] == [("a", [1, 2]), ("a", [4]), ("b", [0, 1]), ("b", [2, 3])]
    with pytest.raises(ValueError, match="duplicate problem id 'a'"):
        plan_jobs([ps[0], ps[0]], 1, set(), 1)


def test_request_seed_is_stable_and_distinct():
    assert request_seed(0, "p", 1) == request_seed(0, "p", 1)
    assert len({request_seed(0, "p", s) for s in range(50)}) == 50


# ---------------------------------------------------------------- a faulty teacher server

class Teacher:
    """A chat-completions server on 127.0.0.1 that fails on purpose, with seeded draws.

    faults: probability of each of "500", "429", "drop", "hang", "short" per request;
    what is left is a good answer. `delay` slows every good answer (for kill tests).
    `answer(body, i)` makes choice i of a good answer (default: a teacher trace, `_choice`).
    """

    def __init__(self, faults: dict[str, float] | None = None, seed: int = 0, delay: float = 0.0,
                 status: int | None = None, answer=None):
        self.faults, self.delay, self.status, self.answer = faults or {}, delay, status, answer
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.seen: Counter = Counter()  # outcome -> count
        self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _draw(self) -> str:
        with self.lock:
            u, acc = self.rng.random(), 0.0
            for name, p in self.faults.items():
                acc += p
                if u < acc:
                    return name
            return "ok"

    def _handler(self):
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, so dropped connections hit pooled sockets

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outcome = "status" if teacher.status else teacher._draw()
                with teacher.lock:
                    teacher.seen[outcome] += 1
                    teacher.bodies.append(body)
                if outcome == "hang":  # not counted in flight: the client gave up on it at its timeout
                    time.sleep(1.0)
                    self.close_connection = True
                    return
                with teacher.lock:
                    teacher.in_flight += 1
                    teacher.max_in_flight = max(teacher.max_in_flight, teacher.in_flight)
                try:
                    self._answer(body, outcome)
                finally:
                    with teacher.lock:
                        teacher.in_flight -= 1

            def _answer(self, body, outcome):
                if outcome == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if outcome in ("500", "429", "status"):
                    code = teacher.status or int(outcome)
                    extra = {"Retry-After": "0"} if code == 429 else {}
                    return self._send(code, {"error": {"message": f"fault {code}"}}, extra)
                time.sleep(teacher.delay)
                n = 1 if outcome == "short" else body.get("n", 1)
                answer = teacher.answer or (lambda body, i: _choice(i, body["messages"][-1]["content"]))
                self._send(200, {"object": "chat.completion", "choices": [answer(body, i) for i in range(n)]})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                             **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def _choice(i: int, question: str) -> dict:
    """Alternate R1-style (reasoning field) and think-in-content answers."""
    if i % 2:
        msg = {"role": "assistant", "content": "So \\boxed{42}.", "reasoning_content": f"About {question}: 42."}
    else:
        msg = {"role": "assistant", "content": f"<think>\nAbout {question}: 42.\n</think>\n\nSo \\boxed{{42}}."}
    return {"index": i, "message": msg, "finish_reason": "stop"}


@pytest.fixture
def problems() -> list[Problem]:
    return [Problem(id=f"p{i}", prompt=f"What is {i} + 42 - {i}?", ground_truth="42") for i in range(12)]


def _config(url: str, **kw) -> GenerateConfig:
    base = dict(engine="openai", model="teacher-x", base_url=url, k=3, n_per_request=2, concurrency=3,
                retries=20, timeout=0.5, backoff=0.01, max_backoff=0.05, max_tokens=64)
    return GenerateConfig(**{**base, **kw})


def _pairs(path: Path) -> Counter:
    return Counter((t.problem.id, t.sample) for t in read_jsonl(path, Trace))


def test_faulty_server_every_pair_exactly_once(tmp_path, problems):
    teacher = Teacher({"500": 0.15, "429": 0.15, "drop": 0.15, "hang": 0.05, "short": 0.15}, seed=1)
    try:
        report = generate_traces(problems, tmp_path / "t.jsonl", _config(teacher.url))
    finally:
        teacher.close()
    assert (report.total, report.done_before, report.generated, report.failed) == (36, 0, 36, 0)
    pairs = _pairs(tmp_path / "t.jsonl")
    assert set(pairs) == {(p.id, s) for p in problems for s in range(3)}
    assert set(pairs.values()) == {1}
    assert all(teacher.seen[k] > 0 for k in ("500", "429", "drop", "hang", "short", "ok")), teacher.seen
    assert teacher.max_in_flight <= 3
    assert {b["n"] for b in teacher.bodies} == {1, 2}  # chunks of n_per_request=2, the rest, re-asks
    traces = list(read_jsonl(tmp_path / "t.jsonl", Trace))
    assert {t.sampling["style"] for t in traces} == {"think", "field"}
    t = traces[0]
    assert (t.teacher, t.answer, t.sampling["temperature"], t.sampling["finish_reason"]) == (
        "teacher-x", "So \\boxed{42}.", 0.8, "stop")
    assert t.reasoning == f"About {t.problem.prompt}: 42."


def test_request_body_carries_the_chat_format_and_extra_fields(tmp_path, problems):
    teacher = Teacher()
    cfg = _config(teacher.url, k=1, request_seed=True,
                  extra_body={"top_k": 20, "max_tokens": None, "max_completion_tokens": 99},
                  chat=ChatConfig(system_prompt="Think first."))
    try:
        generate_traces(problems[:1], tmp_path / "t.jsonl", cfg)
    finally:
        teacher.close()
    (body,) = teacher.bodies
    assert body["messages"] == [{"role": "system", "content": "Think first."},
                                {"role": "user", "content": problems[0].prompt}]
    assert (body["model"], body["n"], body["top_k"], body["max_completion_tokens"]) == ("teacher-x", 1, 20, 99)
    assert "max_tokens" not in body
    assert body["seed"] == request_seed(0, "p0", 0)


def test_failures_are_counted_and_retried_by_the_next_run(tmp_path, problems):
    out = tmp_path / "t.jsonl"
    down = Teacher(status=503)
    try:
        report = generate_traces(problems[:2], out, _config(down.url, retries=2))
    finally:
        down.close()
    assert (report.generated, report.failed, report.failures) == (0, 6, {"http 503": 6})
    assert down.seen["status"] == 4 * 3  # 4 requests (2 problems x 2 chunks), 3 attempts each
    bad_request = Teacher(status=400)
    try:
        report = generate_traces(problems[:2], out, _config(bad_request.url))
    finally:
        bad_request.close()
    assert (report.failed, report.failures, bad_request.seen["status"]) == (6, {"http 400": 6}, 4)  # no retry
    up = Teacher()
    try:
        report = generate_traces(problems[:2], out, _config(up.url))
    finally:
        up.close()
    assert (report.done_before, report.generated, report.failed, report.missing) == (0, 6, 0, 0)


def test_truncated_and_unsplittable_responses_are_failures(tmp_path, problems, monkeypatch):
    teacher = Teacher()
    monkeypatch.setattr(sys.modules[__name__], "_choice", lambda i, q: {
        "index": i, "message": {"content": ["no answer", "<think>cut"][i % 2]},
        "finish_reason": ["stop", "length"][i % 2]})
    try:
        report = generate_traces(problems[:2], tmp_path / "t.jsonl", _config(teacher.url, k=2))
    finally:
        teacher.close()
    assert report.failures == {"no think block, reasoning field or final \\boxed{} answer": 2,
                               "truncated (finish_reason=length)": 2}
    assert (tmp_path / "t.jsonl").read_text() == ""


def test_fatal_status_stops_the_run(tmp_path, problems):
    teacher = Teacher(status=401)
    try:
        with pytest.raises(TeacherError, match="HTTP 401") as err:
            generate_traces(problems, tmp_path / "t.jsonl", _config(teacher.url))
    finally:
        teacher.close()
    assert err.value.fatal
    assert teacher.seen["status"] <= 3  # one per worker at most, no retries


def test_api_key_from_the_named_env_var(tmp_path, problems, monkeypatch):
    seen = []
    teacher = Teacher()
    handler = teacher.server.RequestHandlerClass
    original = handler._answer
    monkeypatch.setattr(handler, "_answer", lambda self, body, outcome: (
        seen.append(self.headers.get("Authorization")), original(self, body, outcome)))
    monkeypatch.setenv("MY_TEACHER_KEY", "sk-test")
    try:
        generate_traces(problems[:1], tmp_path / "t.jsonl", _config(teacher.url, k=1, api_key_env="MY_TEACHER_KEY"))
    finally:
        teacher.close()
    assert seen == ["Bearer sk-test"]


# ---------------------------------------------------------------- resume

def test_synthetic_engine_and_rerun_is_a_no_op(tmp_path):
    problems = generate_problems(5, seed=3)
    cfg = GenerateConfig(engine="synthetic", k=2, seed=7)
    report = generate_traces(problems, tmp_path / "t.jsonl", cfg)
    assert (report.generated, report.failed) == (10, 0)
    first = (tmp_path / "t.jsonl").read_text()
    again = generate_traces(problems, tmp_path / "t.jsonl", cfg)
    assert (again.done_before, again.generated) == (10, 0)
    assert (tmp_path / "t.jsonl").read_text() == first
    traces = list(read_jsonl(tmp_path / "t.jsonl", Trace))
    assert {(t.teacher, t.sampling["engine"], t.sampling["seed"]) for t in traces} == {("synthetic", "synthetic", 7)}
    assert all(parse_think(format_response(t.reasoning, t.answer, cfg.chat)).ok for t in traces)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "reason.cli", "distill", "generate", *args]


def run_until_killed(cmd: list[str], out: Path, min_lines: int, limit: float = 300.0) -> int:
    """Start `cmd`, SIGKILL it once `out` has `min_lines` lines; return the lines then."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= min_lines:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.read_bytes().count(b"\n")


def test_kill_and_resume_ends_with_exactly_k_per_problem(tmp_path, problems):
    src = tmp_path / "problems.jsonl"
    write_jsonl(src, problems)
    out = tmp_path / "traces.jsonl"
    teacher = Teacher({"500": 0.1, "drop": 0.1}, seed=2, delay=0.05)
    cfg = _config(teacher.url, model="t", k=4, n_per_request=1, concurrency=2)
    sets = [f"{k}={v}" for k, v in cfg.model_dump(include={"base_url", "model", "k", "n_per_request",
                                                          "concurrency", "backoff", "retries"}).items()]
    try:
        killed_at = run_until_killed(_cli("--problems", str(src), "--out", str(out),
                                          *[a for s in sets for a in ("--set", s)]), out, min_lines=8)
        assert 8 <= killed_at < 48
        with out.open("a") as f:
            f.write('{"problem": {"id": "p0", "prom')  # a line torn by the kill
        report = generate_traces(problems, out, cfg)
    finally:
        teacher.close()
    assert (report.done_before, report.generated, report.failed, report.missing) == (killed_at, 48 - killed_at, 0, 0)
    pairs = _pairs(out)
    assert set(pairs) == {(p.id, s) for p in problems for s in range(4)}
    assert set(pairs.values()) == {1}


# ---------------------------------------------------------------- CLI

def test_cli_prints_the_report_as_json(tmp_path):
    src = tmp_path / "problems.jsonl"
    write_jsonl(src, generate_problems(3, seed=0))
    args = ["generate", "-p", str(src), "-o", str(tmp_path / "t.jsonl"), "--set", "engine=synthetic", "--set", "k=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"total": 6, "done_before": 0, "generated": 6, "failed": 0,
                                         "failures": {}, "missing": 0}


def test_cli_bad_problem_line_names_file_and_line_and_keeps_output(tmp_path, problems):
    src = tmp_path / "problems.jsonl"
    src.write_text(problems[0].model_dump_json() + "\n" + '{"id": "p1"}\n')
    out = tmp_path / "traces.jsonl"
    out.write_text("keep me\n")
    result = CliRunner().invoke(app, ["generate", "--problems", str(src), "--out", str(out),
                                      "--set", "engine=synthetic"])
    assert result.exit_code == 2
    assert f"{src}:2:" in result.output and "prompt" in result.output
    assert out.read_text() == "keep me\n"


def test_cli_bad_config_key_and_bad_output_file(tmp_path, problems):
    src = tmp_path / "problems.jsonl"
    write_jsonl(src, problems[:1])
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("engine: synthetic\nsamples: 3\n")
    result = CliRunner().invoke(app, ["generate", "-p", str(src), "-o", str(tmp_path / "t.jsonl"), "-c", str(cfg)])
    assert result.exit_code == 2 and f"{cfg}:2" in result.output and "samples" in result.output
    out = tmp_path / "broken.jsonl"
    out.write_text("not json\n{}\n")
    result = CliRunner().invoke(app, ["generate", "-p", str(src), "-o", str(out), "--set", "engine=synthetic"])
    assert result.exit_code == 2 and f"{out}:1:" in result.output
    assert out.read_text() == "not json\n{}\n"
