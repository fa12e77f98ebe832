"""Teachable-prompt selection: keep the problems at the edge of a model's ability.

Phi-4-reasoning (arXiv 2504.21318; docs/recipes.md §1): seeds are "teachable" when
weaker models sometimes but not always agree with a reference answer. For each problem
we sample `n` answers from `model` (a local engine through `reason.engine`, or an
OpenAI-compatible endpoint through `distill.teacher`) and measure how often the
verifier, in its killable pool, finds them equal to the reference answer:
- the ground truth, where the problem has one (checks that timed out or errored are
  left out of the share);
- else the `reference`: an answer from a file, or the plurality answer of `n`
  samples of a stronger model, kept only when it holds at least `min_agreement` of
  them (answers grouped by `reason.passk.plurality`); without a clear plurality the
  problem is dropped as "too hard or ambiguous", never measured against itself.
Problems whose rate lies inside `band` are kept (paper knob; default [0.1, 0.6]
over n = 8, open-r1's published precedent: the exact Phi thresholds are not
public). Every problem, kept or dropped, gets `metadata.pass_rate`.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from typing import Annotated, Literal, NamedTuple, Sequence

from pydantic import AfterValidator, Field, model_validator

from distill.filters import FilterResult, VerifyOptions, partition, verify_records, verify_scorer
from reason.chat import ChatConfig, build_messages, format_response
from reason.config import Section
from reason.console import progress
from reason.errors import UserError
from reason.passk import EPS, band_verdict, equivalence_pairs, plurality, vote_keys
from reason.records import Problem, Rollout, existing, read_jsonl
from rewards.format import answer_text
from rewards.math import extract_answer
from rewards.score import Scorer

SCORED = ("correct", "incorrect", "no_answer")  # verifier statuses that count towards a pass rate


def _check_band(band: tuple[float, float]) -> tuple[float, float]:
    if not 0.0 <= band[0] <= band[1] <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got {list(band)}")
    return band


Band = Annotated[tuple[float, float], AfterValidator(_check_band)]  # [low, high] of a pass rate


class ReferenceConfig(Section):
    """Where problems without a ground truth get their reference answer (one of the two)."""

    answers: str | None = None  # a JSONL file of {"id", "answer"}
    model: str | None = None  # a stronger model, sampled like `model` (same engine and endpoint)
    n: int = Field(8, ge=1)  # its samples per problem
    min_agreement: float = Field(0.5, gt=0.0, le=1.0)  # the plurality's share of them, or "ambiguous"

    @model_validator(mode="after")
    def _one(self) -> "ReferenceConfig":
        if (self.answers is None) == (self.model is None):
            raise ValueError("give exactly one of reference.answers (a file) and reference.model")
        return self


class SelectConfig(Section):
    engine: Literal["auto", "vllm", "hf", "openai"] = "auto"  # auto: vLLM when installed, else HF generate
    model: str = "default"  # a model directory ("default": the embedded SmolLM2), or the served name (openai)
    base_url: str = "http://127.0.0.1:8000/v1"  # openai
    api_key_env: str | None = "OPENAI_API_KEY"  # openai: env var holding the key
    n: int = Field(8, ge=1)  # samples per problem
    band: Band = (0.1, 0.6)  # keep problems with low <= pass rate <= high
    temperature: float = Field(0.8, ge=0.0)  # the Phi-4 evaluation protocol's sampling
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(2048, ge=1)
    seed: int = 0
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # local engines; auto: bf16 where the hardware is fast at it
    gpu_memory_utilization: float = Field(0.2, gt=0.0, le=1.0)  # vllm; on CPU the share of RAM for KV cache
    batch: int = Field(32, ge=1)  # prompts per engine call (local) / requests in flight (openai)
    retries: int = Field(5, ge=0)  # openai, per request
    timeout: float = Field(600.0, gt=0.0)  # openai, seconds per request
    bins: int = Field(10, ge=1)  # pass-rate histogram bins over [0, 1]
    verify: VerifyOptions = Field(default_factory=VerifyOptions)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    reference: ReferenceConfig | None = None  # for problems without a ground truth; none: they are dropped


# ---------------------------------------------------------------- pure parts

def pass_rate(statuses: Sequence[str]) -> float | None:
    """Share of correct among the samples that got a verdict; None when none did.

    >>> pass_rate(["correct", "incorrect", "timeout", "no_answer"])
    0.3333333333333333
    """
    scored = [s for s in statuses if s in SCORED]
    return sum(s == "correct" for s in scored) / len(scored) if scored else None


def rate_histogram(rates: Sequence[float], bins: int) -> list[int]:
    """Counts of rates in `bins` equal bins over [0, 1]; bin i is [i/bins, (i+1)/bins), the last holds 1.0."""
    counts = [0] * bins
    for r in rates:
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"a pass rate must be in [0, 1], got {r}")
        counts[min(bins - 1, int(r * bins + EPS))] += 1
    return counts


# ---------------------------------------------------------------- sampling

def _rollout(problem: Problem, text: str, finish_reason: str | None) -> Rollout:
    return Rollout(problem=problem, completion=text, finish_reason="length" if finish_reason == "length" else "stop")


def _sample_local(problems: list[Problem], cfg: SelectConfig, advance, start: int) -> list[list[Rollout]]:
    from reason.chat import render_prompt
    from reason.engine import SamplingConfig, engine_dtype, make_engine
    from reason.models import resolve

    engine = make_engine(cfg.engine, resolve(cfg.model, "model"), engine_dtype(cfg.dtype), seed=cfg.seed,
                         gpu_memory_utilization=cfg.gpu_memory_utilization)
    out = []
    for i in range(0, len(problems), cfg.batch):
        batch = problems[i:i + cfg.batch]
        # A seed per batch: the same seed for every batch would replay one random stream.
        sp = SamplingConfig(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=cfg.seed + start + i)
        prompts = [render_prompt(engine.tokenizer, p.prompt, cfg.chat) for p in batch]
        for p, samples in zip(batch, engine.generate(prompts, sp)):
            out.append([_rollout(p, s.text, s.finish_reason) for s in samples])
        advance(len(batch))
    return out


async def _sample_openai(problems: list[Problem], cfg: SelectConfig, advance) -> list[list[Rollout]]:
    from distill.teacher import EndpointConfig, TeacherError

    out: list[list[Rollout]] = [[] for _ in problems]
    endpoint = EndpointConfig(base_url=cfg.base_url, api_key_env=cfg.api_key_env, concurrency=cfg.batch,
                              retries=cfg.retries, timeout=cfg.timeout)
    async with endpoint.client(cfg.model, cfg.seed) as client:

        async def ask(i: int, p: Problem) -> None:
            messages = build_messages(p.prompt, cfg.chat)
            while len(out[i]) < cfg.n:  # a server may return fewer choices than asked
                try:
                    choices = await client.chat(messages, n=cfg.n - len(out[i]), temperature=cfg.temperature,
                                                top_p=cfg.top_p, max_tokens=cfg.max_tokens)
                except TeacherError as e:
                    if e.fatal:
                        raise
                    break  # the problem keeps the samples it has; none at all drops it
                if not choices:
                    break
                for ch in choices:
                    text = format_response(ch.reasoning, ch.content, cfg.chat) if ch.reasoning else ch.content
                    out[i].append(_rollout(p, text, ch.finish_reason))
            advance(1)

        await asyncio.gather(*(ask(i, p) for i, p in enumerate(problems)))
    return out


def sample_rollouts(problems: list[Problem], cfg: SelectConfig, start: int = 0) -> list[list[Rollout]]:
    """Up to `cfg.n` reference-model responses per problem (fewer only where an endpoint failed).

    `start`: the position of problems[0] in the whole run. A shard of a fanned-out run
    (distill.fanout) that begins on a batch boundary seeds each local-engine batch as the
    one-process run does, so it samples the same responses.
    """
    if cfg.engine == "openai" and cfg.model == "default":
        raise UserError("model: engine 'openai' needs the served model name")
    with progress() as bar:
        task = bar.add_task(f"sampling ({cfg.engine})", total=len(problems))
        advance = lambda k: bar.advance(task, k)  # noqa: E731
        if cfg.engine == "openai":
            return asyncio.run(_sample_openai(problems, cfg, advance))
        return _sample_local(problems, cfg, advance, start)


# ---------------------------------------------------------------- measuring

class Measured(NamedTuple):
    rate: float | None  # None: nothing could be measured; `reason` says why
    samples: int
    against: Literal["ground_truth", "reference"]
    reference: str | None = None  # the reference answer measured against, when there was no gold
    reason: str | None = None
    agreement: float | None = None  # the reference model's plurality share


class Reference(NamedTuple):
    answer: str | None  # None: no clear plurality
    agreement: float | None = None  # the share of the reference model's samples that gave it


def _has_gold(p: Problem) -> bool:
    return p.ground_truth is not None and bool(p.ground_truth.strip())


def plurality_answers(groups: list[list[Rollout]], min_agreement: float, scorer: Scorer) -> list[Reference]:
    """Each group's plurality answer (equal answers merged by the verifier), where it holds at
    least `min_agreement` of the group's samples; else Reference(None, its share)."""
    answers = [[extract_answer(answer_text(r.completion, scorer.think_close)) for r in g] for g in groups]
    pairs = sorted({pair for ans in answers for pair in equivalence_pairs(vote_keys(ans))})
    statuses = scorer.verify([(f"\\boxed{{{b}}}", a) for a, b in pairs]) if pairs else []  # `a` as the reference
    equal = {pair for pair, status in zip(pairs, statuses) if status == "correct"}
    out = []
    for ans in answers:
        first, votes = plurality(ans, lambda a, b: (a, b) in equal)
        share = votes / len(ans) if ans else 0.0
        out.append(Reference(ans[first] if first is not None and share >= min_agreement - EPS else None, share))
    return out


def reference_answers(problems: list[Problem], cfg: SelectConfig, scorer: Scorer, start: int = 0
                      ) -> dict[str, Reference]:
    """Reference answers for the problems without a ground truth, by id (absent: none to be had)."""
    todo, ref = [p for p in problems if not _has_gold(p)], cfg.reference
    if not todo or ref is None:
        return {}
    if ref.answers is not None:
        rows = {str(r.get("id")): r.get("answer") for r in read_jsonl(existing(ref.answers, "reference.answers"))}
        return {p.id: Reference(str(rows[p.id])) for p in todo if rows.get(p.id) not in (None, "")}
    strong = cfg.model_copy(update={"model": ref.model, "n": ref.n, "seed": cfg.seed + 1})
    groups = []  # batch by batch as `problems` is sampled, so a shard of a fanned-out run samples the same
    for i in range(0, len(problems), cfg.batch):
        batch = [p for p in problems[i:i + cfg.batch] if not _has_gold(p)]
        groups += sample_rollouts(batch, strong, start + i) if batch else []
    return dict(zip((p.id for p in todo), plurality_answers(groups, ref.min_agreement, scorer)))


def measure(problems: list[Problem], groups: list[list[Rollout]], scorer: Scorer,
            references: dict[str, Reference] | None = None) -> list[Measured]:
    """Pass rate per problem: against the ground truth, else against its reference answer."""
    references = references or {}
    golds = [p.ground_truth if _has_gold(p) else getattr(references.get(p.id), "answer", None) for p in problems]
    judged = [(i, r) for i, (gold, g) in enumerate(zip(golds, groups)) if gold for r in g]
    statuses = iter(verify_records([r.model_copy(update={"problem": r.problem.model_copy(
        update={"ground_truth": golds[i]})}) for i, r in judged], scorer))
    out = []
    for p, gold, g in zip(problems, golds, groups):
        ref = None if _has_gold(p) else references.get(p.id)
        against = "ground_truth" if ref is None and _has_gold(p) else "reference"
        agreement = ref.agreement if ref else None
        if not gold:
            why = "no_reference" if ref is None else "ambiguous"
            out.append(Measured(None, len(g), against, reason=why, agreement=agreement))
            continue
        mine = [next(statuses) for _ in g]
        rate = pass_rate(mine)
        reason = ("no_samples" if not g else "bad_gold" if "bad_gold" in mine else
                  "unverified" if rate is None else None)
        out.append(Measured(None if reason else rate, len(g), against, None if ref is None else gold, reason,
                            agreement))
    return out


# ---------------------------------------------------------------- selection

def _annotated(p: Problem, m: Measured, cfg: SelectConfig) -> Problem:
    info = {"samples": m.samples, "against": m.against, "model": cfg.model}
    if m.against == "reference":
        info["reference_answer"] = m.reference
        if cfg.reference is not None and cfg.reference.model is not None:
            info.update(reference_model=cfg.reference.model, reference_agreement=m.agreement)
    meta = {**p.metadata, "select": info}
    if m.rate is not None:
        meta["pass_rate"] = m.rate
    return p.model_copy(update={"metadata": meta})


def measure_problems(problems: list[Problem], cfg: SelectConfig, start: int = 0) -> list[Measured]:
    """Sample `cfg.n` responses per problem and measure each pass rate (`start`: see sample_rollouts)."""
    groups = sample_rollouts(problems, cfg, start)
    with verify_scorer(cfg.verify, cfg.chat) as scorer:
        return measure(problems, groups, scorer, reference_answers(problems, cfg, scorer, start))


def select_teachable(problems: list[Problem], cfg: SelectConfig) -> FilterResult:
    """Sample, measure and keep the problems whose pass rate is inside `cfg.band`.

    Returns (kept, dropped, report) like the filters; every problem carries its
    `metadata.pass_rate` (when measurable) and `metadata.select`. Drop reasons:
    too_easy, too_hard, bad_gold (unusable ground truth), unverified (every check
    timed out), no_samples (the endpoint gave none), no_reference (no ground truth
    and no reference answer), ambiguous (the reference model has no clear plurality).
    """
    return select_measured(problems, measure_problems(problems, cfg), cfg)


def select_measured(problems: list[Problem], measured: list[Measured], cfg: SelectConfig) -> FilterResult:
    """Keep or drop each problem by its measured pass rate, and report (select_teachable's second half)."""
    verdicts = [(m.reason, f"{m.samples} samples") if m.rate is None else band_verdict(m.rate, cfg.band)
                for m in measured]
    rates = [m.rate for m in measured if m.rate is not None]
    kept_rates = [m.rate for m, v in zip(measured, verdicts) if v is None]
    details = {"band": list(cfg.band), "n": cfg.n, "engine": cfg.engine, "model": cfg.model, "bins": cfg.bins,
               "against": dict(Counter(m.against for m in measured)),
               "mean_pass_rate": sum(rates) / len(rates) if rates else None,
               "histogram": rate_histogram(rates, cfg.bins), "histogram_kept": rate_histogram(kept_rates, cfg.bins)}
    return partition("select", [_annotated(p, m, cfg) for p, m in zip(problems, measured)], verdicts, details)
