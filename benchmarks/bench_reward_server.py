"""The reward server under load: concurrent clients on 127.0.0.1 vs `reason reward score` on the same items.

A seeded mix of completions (bench_rewards' kinds, with a share of hostile items whose
check would run for ages) is sent to `reason reward serve` by concurrent clients, in
batches, on /score. Printed: items/s, request latency p50/p99, timeouts, and whether any
item was lost or answered twice; then the same items through `score_samples` in one
process (what `reason reward score` does), items/s, and the ratio.

    python benchmarks/bench_reward_server.py --n 10000 --clients 8 --batch 50 --hostile 0.01 --workers 2
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from bench_rewards import _item
from common import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "reason.cli", "reward", "serve", "--reward", "accuracy", "--port", str(port),
           "--set", f"workers={args.workers}", "--set", f"timeout={args.timeout}",
           "--set", f"max_queue={args.n}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("the reward server did not start")


def load(url: str, records: list[dict], args) -> tuple[float, list[float], list[dict]]:
    batches = [records[i:i + args.batch] for i in range(0, len(records), args.batch)]
    latencies: list[float] = []
    rows: list[dict] = []

    def send(batch: list[dict]) -> None:
        with httpx.Client(timeout=600) as client:
            t0 = time.perf_counter()
            r = client.post(url + "/score", content=json.dumps({"samples": batch}))
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            rows.extend(r.json()["rows"])

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(send, batches))
    return time.perf_counter() - start, latencies, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=50, help="items per request")
    ap.add_argument("--hostile", type=float, default=0.01, help="share of items whose check would hang")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=2.0, help="seconds per item before its worker is killed")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    records = [{"id": f"i{k}", "completion": c, "ground_truth": g}
               for k, (c, g) in enumerate(_item(rng, args.hostile) for _ in range(args.n))]

    proc, url = start_server(args)
    try:
        served_s, latencies, rows = load(url, records, args)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    ids = [r["id"] for r in rows]
    lost, twice = len({r["id"] for r in records} - set(ids)), len(ids) - len(set(ids))

    from rewards.registry import RewardTerm
    from rewards.score import score_samples

    t0 = time.perf_counter()
    local, _ = score_samples(records, [RewardTerm(name="accuracy")], args.workers, args.timeout)
    local_s = time.perf_counter() - t0
    same = {r["id"]: r["score"] for r in rows} == {r["id"]: r["score"] for r in local}

    q = statistics.quantiles(latencies, n=100)
    print(f"{args.n} items, {args.hostile:.1%} hostile, {args.clients} clients x {args.batch} items per request, "
          f"{args.workers} workers, {args.timeout:g} s timeout")
    print(f"server      : {args.n / served_s:8.1f} items/s  ({served_s:.1f} s); request latency p50 {q[49]:.2f} s, "
          f"p99 {q[98]:.2f} s; timeouts {sum(r['status'] == 'timeout' for r in rows)}; lost {lost}, "
          f"answered twice {twice}")
    print(f"reward score: {args.n / local_s:8.1f} items/s  ({local_s:.1f} s); timeouts "
          f"{sum(r['status'] == 'timeout' for r in local)}; same scores as the server: {same}")
    print(f"ratio server/reward score: {local_s / served_s:.2f}x")


if __name__ == "__main__":
    main()
