"""`reason reward serve`, a real server process on 127.0.0.1: OpenRLHF's protocol, hostile items,
tokens, limits, and a graceful SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from rewards.registry import RewardTerm
from rewards.score import score_samples
from tiny import tiny_tokenizer

pytestmark = pytest.mark.slow  # each server warms up math-verify workers: seconds
ROOT = Path(__file__).resolve().parents[1]
HANG = "\\boxed{9^{9^{9^{9}}}}"  # math-verify would compute this for ages
PROMPT = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
RESPONSES = ["<think>\n2 + 2 is 4\n</think>\n\n\\boxed{4}<|im_end|>",  # right, stopped
             "<think>\nmaybe 5\n</think>\n\n\\boxed{5}<|im_end|>",  # wrong, stopped
             "<think>\nlet me think for a long"]  # cut off: no EOS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp_path: Path, *args: str, env: dict | None = None):
        tok_dir = tmp_path / "tok"
        if not tok_dir.exists():
            tiny_tokenizer().save_pretrained(tok_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp_path / f"server-{self.port}.log").open("w")
        cmd = [sys.executable, "-m", "reason.cli", "reward", "serve", "--port", str(self.port),
               "--tokenizer", str(tok_dir), "--set", "workers=2", "--set", "timeout=2", *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, (tmp_path / f"server-{self.port}.log").read_text()[-3000:]
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server never answered /health"
            time.sleep(0.3)

    def post(self, path: str, body, token: str | None = None, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers=headers, timeout=timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server"), "--reward", "phi4_plus", "--set", "max_items=50",
               "--set", "max_body_bytes=20000")
    yield s
    s.stop()


def openrlhf_body(responses: list[str], gold: str = "4") -> dict:
    return {"query": [PROMPT + r for r in responses], "prompts": [PROMPT] * len(responses),
            "labels": [gold] * len(responses)}


def test_openrlhf_request_gives_reason_reward_score_s_rewards(server):
    r = server.post("/get_reward", openrlhf_body(RESPONSES))
    assert r.status_code == 200, r.text
    got = r.json()
    tok = tiny_tokenizer()
    records = [{"completion": resp.removesuffix("<|im_end|>"), "ground_truth": "4",
                "num_tokens": len(tok.encode(resp, add_special_tokens=False)),
                "finish_reason": "stop" if resp.endswith("<|im_end|>") else "length"} for resp in RESPONSES]
    rows, _ = score_samples(records, [RewardTerm(name="phi4_plus")], workers=1)
    assert got["rewards"] == got["scores"] == pytest.approx([row["score"] for row in rows])
    assert got["extra_logs"]["acc"] == [1.0, 0.0, 0.0] and got["extra_logs"]["truncated"] == [0.0, 0.0, 1.0]
    plain = server.post("/score", {"samples": records}).json()["rows"]
    assert [row["score"] for row in plain] == pytest.approx(got["rewards"])


def test_hostile_items_time_out_without_stalling_other_requests(server):
    slow: dict = {}

    def hostile():
        slow["r"] = server.post("/score", {"samples": [{"completion": HANG, "ground_truth": "2", "num_tokens": 9,
                                                         "finish_reason": "stop"}]})

    t = threading.Thread(target=hostile)
    t.start()
    time.sleep(0.3)  # the hostile item now holds one worker
    start = time.monotonic()
    for _ in range(3):
        assert server.post("/get_reward", openrlhf_body(RESPONSES[:1])).json()["rewards"][0] > 0.5
    assert time.monotonic() - start < 2.0  # well inside the hostile item's 2 s timeout
    t.join()
    (row,) = slow["r"].json()["rows"]
    assert row["status"] == "timeout" and row["components"]["acc"] == 0.0


@pytest.mark.parametrize("body, status, field", [
    (b"{not json", 400, "body: not valid JSON"),
    ({"query": ["x"], "prompts": "x"}, 422, "prompts"),
    ({"query": ["x"]}, 422, "prompts: Field required"),
    ({"query": ["a", "b"], "prompts": ["a"]}, 422, "differ in length"),
    ({"query": ["zz"], "prompts": ["a"]}, 422, "query[0]: does not start with prompts[0]"),
    ({"samples": [{"completion": 3}]}, 422, "samples.0.completion"),
    ({"samples": [{"completion": "x", "num_tokens": -1}]}, 422, "samples.0.num_tokens"),
])
def test_bad_input_is_a_4xx_naming_the_field(server, body, status, field):
    path = "/score" if isinstance(body, dict) and "samples" in body else "/get_reward"
    r = server.post(path, body)
    assert r.status_code == status and field in r.json()["detail"], r.text


def test_limits_answer_413(server):
    many = server.post("/score", {"samples": [{"completion": "\\boxed{1}", "ground_truth": "1"}] * 51})
    assert many.status_code == 413 and "max_items 50" in many.json()["detail"]
    big = server.post("/score", {"samples": [{"completion": "x" * 30000, "ground_truth": "1"}]})
    assert big.status_code == 413 and "max_body_bytes" in big.json()["detail"]


def test_a_missing_or_wrong_token_is_refused_and_a_full_queue_answers_429(tmp_path):
    s = Server(tmp_path, "--reward", "accuracy", "--set", "max_queue=2", env={"REASON_REWARD_TOKEN": "s3cret"})
    try:
        body = {"samples": [{"completion": "\\boxed{1}", "ground_truth": "1"}]}
        for token in (None, "wrong"):
            r = s.post("/score", body, token=token)
            assert r.status_code == 401 and r.json() == {}
        assert s.post("/score", body, token="s3cret").status_code == 200
        held = threading.Thread(target=s.post, args=("/score", {"samples": [
            {"completion": HANG, "ground_truth": "2"}, {"completion": HANG, "ground_truth": "3"}]}, "s3cret"))
        held.start()
        time.sleep(0.5)  # two hostile items fill the queue of 2
        full = s.post("/score", body, token="s3cret")
        assert full.status_code == 429 and full.headers["retry-after"] == "5"
        held.join()
    finally:
        s.stop()
    done = subprocess.run([sys.executable, "-m", "reason.cli", "reward", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "REASON_REWARD_TOKEN": ""})
    assert done.returncode == 2 and "needs a bearer token" in done.stderr


def test_sigterm_lets_an_in_flight_request_finish(tmp_path):
    s = Server(tmp_path, "--reward", "accuracy")
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(r=s.post("/score", {"samples": [
        {"completion": HANG, "ground_truth": "2"}, {"completion": "\\boxed{1}", "ground_truth": "1"}]})))
    t.start()
    time.sleep(0.5)  # in flight: the hostile item needs its 2 s timeout
    assert s.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    t.join()
    assert got["r"].status_code == 200
    assert [row["status"] for row in got["r"].json()["rows"]] == ["timeout", "ok"]
