"""Teacher trace generation: k samples per problem, appended as they arrive, resumable.

The first step of every distillation recipe (docs/recipes.md §1, §3): Phi-4-reasoning distils o3-mini traces,
Phi-4-mini-reasoning distils 8 R1 rollouts per problem (`k`). A run of that size is
killed sooner or later, so each (problem, sample) pair is written the moment it is
normalised, and a restarted run reads the output first and only asks for the pairs that
are missing: nothing is repeated and nothing is lost. Pairs that fail (after the
teacher client's retries, or because the response is truncated or has no usable
reasoning/answer split) are counted by reason and left missing, so running the same
command again retries exactly those.

Engines: "openai" (any OpenAI-compatible server: vLLM's, a hosted teacher), "vllm" or
"hf" (a local engine through `reason.engine`; HF generate where vLLM is absent),
"synthetic" (`distill.synthetic`'s programmatic teacher, for the demo).
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from distill.normalize import normalize
from distill.teacher import EndpointConfig, TeacherClient, TeacherError, drain
from reason.chat import ChatConfig, build_messages
from reason.console import progress
from reason.errors import UserError
from reason.records import JsonlAppender, Problem, Trace, read_jsonl


class GenerateConfig(EndpointConfig):
    """The endpoint keys (base_url, retries, ...) are EndpointConfig's; `concurrency` is also the
    prompts per engine call of the local engines."""

    engine: Literal["openai", "vllm", "hf", "synthetic"] = "openai"
    model: str = ""  # the served model name (openai) or a model directory (vllm, hf)
    teacher: str | None = None  # name recorded on each trace; default: model, or "synthetic"
    k: int = Field(1, ge=1)  # samples per problem (Phi-4-mini: 8 R1 rollouts per problem)
    temperature: float = Field(0.8, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(4096, ge=1)
    n_per_request: int = Field(8, ge=1)  # samples asked in one request; 1 for servers without `n`
    seed: int = 0  # vllm: the engine's seed; synthetic: the trace seed; openai: jitter (and request_seed)
    request_seed: bool = False  # openai: send a seed derived from (seed, problem, sample) per request
    # Extra request fields merged into the openai request body (vLLM: top_k,
    # structured_outputs, ...; hosted APIs: reasoning_effort); a null value removes a field.
    extra_body: dict[str, Any] = Field(default_factory=dict)
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # local engines; auto: bf16 where the hardware is fast at it
    gpu_memory_utilization: float = Field(0.2, gt=0.0, le=1.0)  # vllm engine; on CPU: share of RAM for KV cache
    mistake_rate: float = Field(0.0, ge=0.0, le=1.0)  # synthetic engine: share of traces with a wrong answer
    glance_rate: float = Field(0.0, ge=0.0, le=1.0)  # synthetic engine: share answered at a glance, unworked
    chat: ChatConfig = Field(default_factory=ChatConfig)


@dataclass
class GenerateReport:
    total: int  # problems x k
    done_before: int  # pairs already in the output when the run started
    generated: int = 0
    failed: int = 0  # pairs left missing this run; running again retries them
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def missing(self) -> int:
        return self.total - self.done_before - self.generated


Job = tuple[Problem, list[int]]  # a problem and the sample indices one request asks for


def done_pairs(out_path: str | Path) -> set[tuple[str, int]]:
    """(problem id, sample) pairs already written to `out_path` (none if it does not exist)."""
    return {(t.problem.id, t.sample) for t in read_jsonl(out_path, Trace)} if Path(out_path).exists() else set()


def plan_jobs(problems: list[Problem], k: int, done: set[tuple[str, int]], n_per_request: int) -> list[Job]:
    """Requests for every missing (problem, sample), at most `n_per_request` samples each."""
    seen: set[str] = set()
    jobs = []
    for p in problems:
        if p.id in seen:
            raise UserError(f"duplicate problem id {p.id!r}: (problem, sample) pairs would collide")
        seen.add(p.id)
        todo = [s for s in range(k) if (p.id, s) not in done]
        jobs += [(p, todo[i:i + n_per_request]) for i in range(0, len(todo), n_per_request)]
    return jobs


def request_seed(seed: int, problem_id: str, sample: int) -> int:
    """A per-request seed that differs by problem and sample and is the same in every process."""
    digest = hashlib.sha256(f"{seed}:{problem_id}:{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class _Sink:
    """Normalises responses, appends traces and counts outcomes as they arrive."""

    def __init__(self, out: JsonlAppender, cfg: GenerateConfig, report: GenerateReport, advance):
        self.out, self.cfg, self.report, self.advance = out, cfg, report, advance
        self.teacher = cfg.teacher or ("synthetic" if cfg.engine == "synthetic" else cfg.model)
        self.sampling = {"engine": cfg.engine, "temperature": cfg.temperature, "top_p": cfg.top_p,
                         "max_tokens": cfg.max_tokens, "seed": cfg.seed}

    def response(self, problem: Problem, sample: int, content: str, reasoning: str | None,
                 finish_reason: str | None) -> None:
        if finish_reason == "length":  # a cut-off trace would teach the student never to stop
            return self.fail("truncated (finish_reason=length)")
        norm = normalize(content, reasoning, self.cfg.chat.think_open, self.cfg.chat.think_close)
        if not norm.ok:
            return self.fail(norm.problem)
        sampling = {**self.sampling, "finish_reason": finish_reason, "style": norm.style}
        self.write(Trace(problem=problem, sample=sample, reasoning=norm.reasoning, answer=norm.answer,
                         teacher=self.teacher, sampling=sampling))

    def write(self, trace: Trace) -> None:
        self.out.write(trace)
        self.report.generated += 1
        self.advance()

    def fail(self, reason: str, n: int = 1) -> None:
        self.report.failed += n
        self.report.failures[reason] = self.report.failures.get(reason, 0) + n
        self.advance(n)


async def _ask(client: TeacherClient, job: Job, cfg: GenerateConfig, sink: _Sink) -> None:
    problem, todo = job
    messages = build_messages(problem.prompt, cfg.chat)
    while todo:  # a server may return fewer choices than `n`; ask again for the rest
        seed = request_seed(cfg.seed, problem.id, todo[0]) if cfg.request_seed else None
        try:
            choices = await client.chat(messages, n=len(todo), temperature=cfg.temperature, top_p=cfg.top_p,
                                        max_tokens=cfg.max_tokens, seed=seed, extra=cfg.extra_body)
        except TeacherError as e:
            if e.fatal:
                raise
            return sink.fail(e.reason, len(todo))
        if not choices:
            return sink.fail("no choices in response", len(todo))
        for s, ch in zip(todo, choices):
            sink.response(problem, s, ch.content, ch.reasoning, ch.finish_reason)
        todo = todo[len(choices):]


async def _run_openai(jobs: list[Job], cfg: GenerateConfig, sink: _Sink) -> None:
    async with cfg.client(cfg.model, cfg.seed) as client:
        await drain(jobs, cfg.concurrency, lambda job: _ask(client, job, cfg, sink))


def _run_local(jobs: list[Job], cfg: GenerateConfig, sink: _Sink, engine) -> None:
    from reason.chat import render_prompt
    from reason.engine import SamplingConfig, engine_dtype, make_engine
    from reason.models import resolve

    if engine is None:
        engine = make_engine(cfg.engine, resolve(cfg.model, "model"), dtype=engine_dtype(cfg.dtype), seed=cfg.seed,
                             gpu_memory_utilization=cfg.gpu_memory_utilization)
    by_n: dict[int, list[Job]] = {}  # one engine call samples the same n for every prompt
    for job in jobs:
        by_n.setdefault(len(job[1]), []).append(job)
    for n, group in by_n.items():
        sp = SamplingConfig(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
        for i in range(0, len(group), cfg.concurrency):
            batch = group[i:i + cfg.concurrency]
            prompts = [render_prompt(engine.tokenizer, p.prompt, cfg.chat) for p, _ in batch]
            for (problem, samples), outs in zip(batch, engine.generate(prompts, sp)):
                for s, out in zip(samples, outs):
                    sink.response(problem, s, out.text, None, out.finish_reason)


def _run_synthetic(jobs: list[Job], cfg: GenerateConfig, sink: _Sink) -> None:
    from distill.synthetic import synthetic_trace

    for problem, samples in jobs:
        for s in samples:
            trace = synthetic_trace(problem, s, cfg.seed, cfg.mistake_rate, cfg.glance_rate)
            sampling = {"engine": "synthetic", **trace.sampling}
            sink.write(trace.model_copy(update={"teacher": sink.teacher, "sampling": sampling}))


def generate_traces(problems: list[Problem], out_path: str | Path, cfg: GenerateConfig,
                    engine=None, skip: set[tuple[str, int]] = frozenset()) -> GenerateReport:
    """Append a Trace for every missing (problem, sample < k) pair to `out_path`.

    `engine`: a live `reason.engine` engine for "vllm"/"hf" (else one is built from cfg.model).
    `skip`: pairs done elsewhere, treated as already written (a Ray shard's share of the
    fanned-out run's output, distill.fanout).

    Raises UserError on duplicate problem ids or no model, RecordError on a malformed output file (left
    as it is), TeacherError when the teacher refuses every request (bad key, unknown model).
    """
    if cfg.engine != "synthetic" and not cfg.model:
        raise UserError(f"model: engine {cfg.engine!r} needs a model (a served model name or a directory)")
    if cfg.engine in ("vllm", "hf") and engine is None:
        from reason.models import resolve

        resolve(cfg.model, "model")  # a bad path fails before the output file is touched
    with JsonlAppender(out_path) as out:  # opening first trims a line torn by a killed run
        done = done_pairs(out_path) | set(skip)
        jobs = plan_jobs(problems, cfg.k, done, cfg.n_per_request)
        total = len(problems) * cfg.k
        report = GenerateReport(total=total, done_before=total - sum(len(s) for _, s in jobs))
        with progress() as bar:
            task = bar.add_task(f"traces ({cfg.engine})", total=total, completed=report.done_before)
            sink = _Sink(out, cfg, report, lambda n=1: bar.advance(task, n))
            if cfg.engine == "openai":
                asyncio.run(_run_openai(jobs, cfg, sink))
            elif cfg.engine in ("vllm", "hf"):
                _run_local(jobs, cfg, sink, engine)
            else:
                _run_synthetic(jobs, cfg, sink)
    return report
