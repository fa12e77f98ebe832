"""Teacher traces and teachable-prompt selection fanned out over a Ray cluster.

`reason distill generate --shards N` and `reason distill select --shards N` (see
reason.fanout for the scheme) give the same output as one process:
  generate  generate_traces per shard of the problems that still miss (problem, sample)
            pairs: pairs already in OUT are skipped (resume), new traces are appended shard
            by shard in problem, then sample order. The texts equal a local run's where
            each pair's sample is fixed by the seed (the synthetic engine); vllm/hf draw one
            random stream across a run's batches and openai answers at random, so there only
            the pairs match.
  select    measure_problems per shard of whole engine batches, each batch seeded as in
            one run, then select_measured over all of them.
  pts       search_batches per shard of the batches the log lacks (each batch is seeded from
            its position, so it finds what one process finds); the driver appends each shard's
            batches to the log in order and writes the pairs from the whole log.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from reason.fanout import gather, ray_task, spans

if TYPE_CHECKING:
    from distill.filters import FilterResult
    from distill.generate import GenerateConfig, GenerateReport
    from distill.pts import PTSConfig, PTSReport
    from distill.select import SelectConfig
    from reason.records import Problem, Trace


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
    from distill.generate import GenerateReport, done_pairs, plan_jobs
    from reason.records import JsonlAppender

    with JsonlAppender(out_path) as out:  # opening first trims a line torn by a killed run
        done = done_pairs(out_path)
        jobs = plan_jobs(problems, cfg.k, done, cfg.n_per_request)
        todo = list({p.id: p for p, _ in jobs}.values())  # problems missing a pair, in input order
        total = len(problems) * cfg.k
        report = GenerateReport(total=total, done_before=total - sum(len(s) for _, s in jobs))
        task = ray_task(_generate_shard, cfg.engine)
        refs = []
        for a, b in spans(len(todo), shards):
            ids = {p.id for p in todo[a:b]}
            refs.append(task.remote(todo[a:b], cfg, {pair for pair in done if pair[0] in ids}))
        for ref in refs:
            traces, part = gather([ref])[0]
            for t in traces:
                out.write(t)
            report.generated, report.failed = report.generated + part.generated, report.failed + part.failed
            report.failures = dict(Counter(report.failures) + Counter(part.failures))
    return report


# ---------------------------------------------------------------- teachable prompts


def select_fanout(problems: list[Problem], cfg: SelectConfig, shards: int) -> FilterResult:
    """select_teachable as Ray tasks: measure shards of whole `cfg.batch` batches, then keep or drop all."""
    from distill.select import measure_problems, select_measured

    task = ray_task(measure_problems, cfg.engine)
    refs = [task.remote(problems[a:b], cfg, a) for a, b in spans(len(problems), shards, cfg.batch)]
    return select_measured(problems, [m for part in gather(refs) for m in part], cfg)


# ---------------------------------------------------------------- pivotal token search


def pts_fanout(problems: list[Problem], out_path: str | Path, cfg: PTSConfig, shards: int,
               log_path: str | Path | None = None) -> PTSReport:
    """pivotal_pairs as Ray tasks: each searches a shard of the missing batches; the log is appended
    shard by shard (a killed driver keeps those), then the pairs are written from the whole log."""
    from distill.pts import check_problems, missing_batches, read_log, search_batches, write_pairs
    from reason.records import JsonlAppender, log_beside

    check_problems(problems)
    log_path = log_path or log_beside(out_path)
    with JsonlAppender(log_path) as log:  # opening first trims a line torn by a killed run
        done = read_log(log_path, problems, cfg)
        before = sum(len(b.ids) for b in done.values())
        todo = missing_batches(problems, done, cfg.batch)
        task = ray_task(search_batches, cfg.engine)
        refs = [task.remote(todo[a:b], cfg) for a, b in spans(len(todo), shards)]
        for ref in refs:
            for batch in gather([ref])[0]:
                log.write(batch)
                done[batch.start] = batch
    return write_pairs(out_path, done, len(problems), before, cfg)
