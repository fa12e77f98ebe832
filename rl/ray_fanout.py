"""Data stages fanned out as Ray tasks, with the same output as the local path.

Each stage splits its input into contiguous shards, runs the stage's own local
function on every shard as one Ray task, and merges the shards' results in input
order, so the output file equals a one-process run's:
  score     rewards.score.score_samples per JSONL shard (= `reason reward score`).
  generate  distill.generate.generate_traces per shard of the problems that still
            miss (problem, sample) pairs: pairs already in OUT are skipped (resume),
            new traces are appended shard by shard in problem, then sample order.
            The texts equal a local run's where each pair's sample is fixed by the
            seed (the synthetic engine); vllm/hf draw one random stream across a
            run's batches and openai answers at random, so there only the pairs match.
  select    distill.select.measure_problems per shard of whole engine batches, each
            batch seeded as in one run, then select_measured over all of them
            (= `reason distill select`).
A task asks for one GPU when its stage runs vLLM ("vllm", or "auto") and the cluster
has GPUs, so each GPU holds one engine (set --shards to the GPU count); else one CPU.

Run inside a Ray job (the entrypoint `python -m rl.ray_fanout STAGE ...`, submitted
with rl.ray_jobs.submit). The driver reads the inputs and writes the outputs; tasks
get their shard as data, so only the config's model (or teacher endpoint) must be
reachable from every node.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.filters import FilterResult
    from distill.generate import GenerateConfig, GenerateReport
    from distill.select import SelectConfig
    from reason.records import Problem, Trace


def spans(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) of at most `shards` contiguous shards of n items; all but the last hold a multiple of `align`.

    >>> spans(7, 3), spans(10, 3, align=4), spans(0, 3)
    ([(0, 3), (3, 6), (6, 7)], [(0, 4), (4, 8), (8, 10)], [])
    """
    size = -(-max(1, n) // max(1, shards))  # ceil, and at least 1
    size = -(-size // align) * align
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _task(fn, engine: str | None = None):
    """`fn` as a Ray task: one GPU where `engine` runs vLLM and the cluster has GPUs, else one CPU."""
    import ray

    gpu = engine in ("vllm", "auto") and ray.cluster_resources().get("GPU", 0) >= 1
    return ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(fn)


# ---------------------------------------------------------------- rewards


def _score_shard(lines: list[str], terms: list[dict], workers: int | None, timeout: float) -> list[dict]:
    """One Ray task: validate and score one shard exactly as `reason reward score` does."""
    from rewards.registry import RewardTerm
    from rewards.score import ScoreSample, score_samples

    samples = [ScoreSample.model_validate_json(line) for line in lines]
    rows, _ = score_samples(samples, [RewardTerm(**t) for t in terms], workers, timeout)
    return rows


def score_fanout(in_path: str | Path, out_path: str | Path, terms: list[dict], shards: int,
                 workers: int | None = 1, timeout: float = 10.0) -> int:
    """Score a JSONL file as `shards` Ray tasks; rows in input order, `index` = line position in the file."""
    import ray

    from reason.records import RecordError, write_jsonl

    lines = [ln for ln in Path(in_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise RecordError(in_path, 0, "no samples")
    parts = spans(len(lines), shards)
    task = _task(_score_shard)
    refs = [task.remote(lines[a:b], terms, workers, timeout) for a, b in parts]
    shard_rows = ray.get(refs)
    return write_jsonl(out_path, [{**r, "index": a + r["index"]} for (a, _), rows in zip(parts, shard_rows)
                                  for r in rows])


# ---------------------------------------------------------------- teacher traces


def _generate_shard(problems: list[Problem], cfg: GenerateConfig, skip: set[tuple[str, int]]
                    ) -> tuple[list[Trace], GenerateReport]:
    """One Ray task: generate_traces on a shard into a scratch file; its traces in (problem, sample) order."""
    from distill.generate import generate_traces
    from reason.records import Trace, read_jsonl

    with tempfile.TemporaryDirectory(prefix="reason-generate-") as tmp:
        out = Path(tmp) / "traces.jsonl"
        report = generate_traces(problems, out, cfg, skip=skip)
        traces = list(read_jsonl(out, Trace))
    order = {p.id: i for i, p in enumerate(problems)}
    return sorted(traces, key=lambda t: (order[t.problem.id], t.sample)), report


def generate_fanout(problems: list[Problem], out_path: str | Path, cfg: GenerateConfig, shards: int
                    ) -> GenerateReport:
    """generate_traces as Ray tasks: append the missing traces to `out_path`; return the GenerateReport.

    Each shard is appended once it and every shard before it have finished, so a killed
    driver keeps those, and running it again asks only for what is still missing.
    """
    import ray

    from distill.generate import GenerateReport, done_pairs, plan_jobs
    from reason.records import JsonlAppender

    with JsonlAppender(out_path) as out:  # opening first trims a line torn by a killed run
        done = done_pairs(out_path)
        jobs = plan_jobs(problems, cfg.k, done, cfg.n_per_request)
        todo = list({p.id: p for p, _ in jobs}.values())  # problems missing a pair, in input order
        total = len(problems) * cfg.k
        report = GenerateReport(total=total, done_before=total - sum(len(s) for _, s in jobs))
        task = _task(_generate_shard, cfg.engine)
        refs = []
        for a, b in spans(len(todo), shards):
            ids = {p.id for p in todo[a:b]}
            refs.append(task.remote(todo[a:b], cfg, {pair for pair in done if pair[0] in ids}))
        for ref in refs:
            traces, part = ray.get(ref)
            for t in traces:
                out.write(t)
            report.generated, report.failed = report.generated + part.generated, report.failed + part.failed
            report.failures = dict(Counter(report.failures) + Counter(part.failures))
    return report


# ---------------------------------------------------------------- teachable prompts


def select_fanout(problems: list[Problem], cfg: SelectConfig, shards: int) -> FilterResult:
    """select_teachable as Ray tasks: measure shards of whole `cfg.batch` batches, then keep or drop all."""
    import ray

    from distill.select import measure_problems, select_measured

    task = _task(measure_problems, cfg.engine)
    refs = [task.remote(problems[a:b], cfg, a) for a, b in spans(len(problems), shards, cfg.batch)]
    return select_measured(problems, [m for part in ray.get(refs) for m in part], cfg)


# ---------------------------------------------------------------- the job's driver


def _parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m rl.ray_fanout", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score a JSONL file (= reason reward score)")
    s.add_argument("--reward", action="append", default=[], help="reward name; repeatable; default phi4_plus")
    s.add_argument("--timeout", type=float, default=10.0)
    sub.add_parser("generate", help="teacher traces (= reason distill generate); resumes from OUT")
    s = sub.add_parser("select", help="teachable problems by pass rate (= reason distill select)")
    s.add_argument("--dropped", help="also write what was dropped")
    for name, s in sub.choices.items():
        s.add_argument("input", help="samples JSONL" if name == "score" else "problems: JSONL, Parquet or dataset dir")
        s.add_argument("--out", required=True)
        s.add_argument("--shards", type=int, default=4)
        if name != "score":
            s.add_argument("--config", "-c", help="the stage's YAML config, as for the local command")
            s.add_argument("--set", action="append", default=[], dest="overrides", help="KEY=VALUE; repeatable")
    return p


def _run(a) -> dict:
    """Run one stage as parsed from the command line; return the summary line's fields."""
    if a.cmd == "score":
        return {"scored": score_fanout(a.input, a.out, [{"name": n} for n in a.reward or ["phi4_plus"]], a.shards,
                                       timeout=a.timeout)}
    from distill.problems import load_problems
    from reason.config import load_config

    problems = load_problems(a.input, require_answer=False)
    if a.cmd == "generate":
        from distill.generate import GenerateConfig

        report = generate_fanout(problems, a.out, load_config(GenerateConfig, a.config, a.overrides), a.shards)
        return {**asdict(report), "missing": report.missing}
    from distill.cli import write_result
    from distill.select import SelectConfig

    result = select_fanout(problems, load_config(SelectConfig, a.config, a.overrides), a.shards)
    write_result(Path(a.out), Path(a.dropped) if a.dropped else None, "select", result)
    return result.report.model_dump(mode="json")


def _main(argv: list[str] | None = None) -> None:
    """`python -m rl.ray_fanout score|generate|select INPUT --out OUT --shards N ...`: a fan-out job's driver."""
    import ray

    a = _parser().parse_args(argv)
    ray.init(address="auto")
    print(json.dumps({**_run(a), "shards": a.shards, "out": a.out}))


if __name__ == "__main__":
    _main()
