"""`reason eval`: sample n answers per problem, verify them, report pass@k and friends.

The Phi-4 protocol (arXiv 2504.21318; docs/recipes.md §2): pass@1 averaged over n samples per
problem (5 by default), temperature 0.8, top_p 0.95. Beside pass@1 the summary
gives unbiased pass@k and maj@k, response length in tokens, the truncation rate
and the format-violation rate, overall and per source, and records the model, n,
seed and every sampling parameter so a score can be reproduced. Same config and
seed -> same numbers.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeFloat, PositiveInt

from reason.chat import ChatConfig, render_prompt
from reason.config import Section
from reason.engine import HFEngine, Sample, SamplingConfig, VLLMEngine, make_engine
from reason.errors import UserError
from reason.passk import bootstrap_ci, equivalence_pairs, maj_at_k, mean, pass1_mean, pass_at_k, vote_keys
from reason.problems import ProblemSource, SyntheticSpec, load_source
from reason.records import Problem, write_jsonl
from rewards.format import answer_text, parse_think
from rewards.math import extract_answer
from rewards.registry import RewardConfig, RewardTerm
from rewards.score import Scorer, ScoreSample, is_correct


class EvalSampling(SamplingConfig):
    """The Phi-4 protocol as class defaults, so `--set sampling.n=50` keeps the rest."""

    n: PositiveInt = 5
    temperature: NonNegativeFloat = 0.8
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: PositiveInt = 1024
    seed: int | None = 0


class EvalReward(RewardConfig):
    """Eval needs the verdict (the "acc" component); the default reward gives only that."""

    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="accuracy")])


class EvalConfig(Section):
    model: str = "default"  # a model directory, or the embedded SmolLM2-135M-Instruct
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 where the hardware is fast at it
    engine: Literal["vllm", "hf", "auto"] = "auto"
    problems: ProblemSource = Field(default_factory=lambda: ProblemSource(synthetic=SyntheticSpec()))
    chat: ChatConfig = Field(default_factory=ChatConfig)
    sampling: EvalSampling = Field(default_factory=EvalSampling)
    reward: EvalReward = Field(default_factory=EvalReward)
    out_dir: str = "runs/eval"


def ks_for(n: int) -> list[int]:
    """The k of pass@k / maj@k: powers of two up to n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def sample_rows(problems: list[Problem], samples: list[list[Sample]], chat: ChatConfig, scorer: Scorer) -> list[dict]:
    """Score every sample; one row per sample with its verdict, answer and format check."""
    flat = [(j, p, i, s) for j, (p, group) in enumerate(zip(problems, samples)) for i, s in enumerate(group)]
    to_score = [ScoreSample(completion=s.text, ground_truth=p.ground_truth, num_tokens=s.num_tokens,
                            finish_reason=s.finish_reason, source=p.source, id=p.id) for _, p, _, s in flat]
    scored, _ = scorer.score(to_score)
    rows = []
    for (j, p, i, s), out in zip(flat, scored):
        if out["components"] is not None and is_correct(out["components"]) is None:
            raise UserError(f"reward: the terms give no 'acc' component ({sorted(out['components'])}); eval needs "
                            "a correctness verdict: add the 'accuracy' reward term")
        rows.append({
            "problem": j, "id": p.id, "source": p.source, "sample": i, "ground_truth": p.ground_truth,
            "answer": extract_answer(answer_text(s.text, chat.think_close)),
            "correct": is_correct(out["components"]),
            "format_ok": parse_think(s.text, chat.think_open, chat.think_close).ok,
            "num_tokens": s.num_tokens, "finish_reason": s.finish_reason,
            "status": out["status"], "score": out["score"], "components": out["components"],
            "completion": s.text,
        })
    return rows


def equal_answers(groups: list[list[dict]], scorer: Scorer) -> set[tuple[str, str]]:
    """The (a, b) vote-key pairs the verifier finds equal, over every problem's answers (for maj@k)."""
    pairs = sorted({pair for g in groups for pair in equivalence_pairs(vote_keys([r["answer"] for r in g]))})
    statuses = scorer.verify([(f"\\boxed{{{b}}}", a) for a, b in pairs])
    return {pair for pair, status in zip(pairs, statuses) if status == "correct"}


def metrics(groups: list[list[dict]], n: int, equal: set[tuple[str, str]] = frozenset()) -> dict:
    """Summary numbers over problems (each a list of its n sample rows).

    A problem is scored when any of its samples has a verdict (an unusable gold gives
    none); pass@k and maj@k use a problem's samples with verdicts, and count it for a k
    only when it has at least k of them.
    """
    rows = [r for g in groups for r in g]
    judged = [[r for r in g if r["correct"] is not None] for g in groups]
    scored = [g for g in judged if g]
    out = {"problems": len(groups), "scored_problems": len(scored), "samples": len(rows),
           "unjudged_samples": sum(r["correct"] is None for r in rows)}
    same = lambda a, b: (a, b) in equal  # noqa: E731
    for k in ks_for(n):
        out[f"pass@{k}"] = mean(pass1_mean([r["correct"] for r in g]) if k == 1 else
                                pass_at_k(len(g), sum(r["correct"] for r in g), k) for g in scored if len(g) >= k)
    per_problem = [pass1_mean([r["correct"] for r in g]) for g in scored]
    out["pass@1_ci"] = list(bootstrap_ci(per_problem)) if per_problem else None  # 95%, over problems
    for k in ks_for(n):
        out[f"maj@{k}"] = mean(maj_at_k([r["answer"] for r in g], [r["correct"] for r in g], k, same)
                               for g in scored if len(g) >= k)
    lengths = [r["num_tokens"] for r in rows]
    out["mean_tokens"] = mean(lengths)
    out["median_tokens"] = statistics.median(lengths) if lengths else None
    out["truncation_rate"] = mean(r["finish_reason"] == "length" for r in rows)
    out["format_violation_rate"] = mean(not r["format_ok"] for r in rows)
    out["verification_timeouts"] = sum(r["status"] == "timeout" for r in rows)
    out["mean_score"] = mean(r["score"] for r in rows if r["score"] is not None)
    return out


def group_rows(rows: list[dict]) -> list[list[dict]]:
    """Per-sample rows grouped by problem, in row order."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["problem"], []).append(r)
    return list(groups.values())


def summarize(rows: list[dict], n: int, equal: set[tuple[str, str]] = frozenset()) -> dict:
    """Overall and per-source metrics from the per-sample rows (problems in row order)."""
    groups = group_rows(rows)
    by_source: dict[str, list[list[dict]]] = {}
    for g in groups:
        by_source.setdefault(g[0]["source"], []).append(g)
    return {"overall": metrics(groups, n, equal),
            "by_source": {s: metrics(gs, n, equal) for s, gs in sorted(by_source.items())}}


def run_eval(cfg: EvalConfig, engine: VLLMEngine | HFEngine | None = None) -> dict:
    """Run the eval; write `samples.jsonl` and `summary.json` to cfg.out_dir; return the summary.

    Pass `engine` to evaluate a live one (e.g. the GRPO policy's); else one is built from cfg.model.
    """
    from reason.engine import engine_dtype
    from reason.models import load_tokenizer, resolve

    problems = load_source(cfg.problems, "problems.path")
    if not problems:
        raise UserError(f"problems: no problems to evaluate in {cfg.problems.describe()}")
    model_dir = resolve(cfg.model, "model")
    dtype = engine_dtype(cfg.dtype)
    sp = cfg.sampling
    if engine is None:
        tokenizer = load_tokenizer(model_dir, "model")
        longest = max(len(tokenizer.encode(render_prompt(tokenizer, p.prompt, cfg.chat), add_special_tokens=False))
                      for p in problems)
        engine = make_engine(cfg.engine, model_dir, dtype, seed=sp.seed or 0, max_model_len=longest + sp.max_tokens)
    prompts = [render_prompt(engine.tokenizer, p.prompt, cfg.chat) for p in problems]
    samples = engine.generate(prompts, sp, progress=True)
    r = cfg.reward
    with Scorer(r.terms, r.workers, r.timeout, cfg.chat.think_open, cfg.chat.think_close) as scorer:
        rows = sample_rows(problems, samples, cfg.chat, scorer)
        equal = equal_answers(group_rows(rows), scorer)
    summary = {
        "model": str(model_dir), "engine": type(engine).__name__, "dtype": dtype,
        "n": sp.n, "seed": sp.seed, "sampling": sp.model_dump(mode="json"),
        **summarize(rows, sp.n, equal), "config": cfg.model_dump(mode="json"),
    }
    out = Path(cfg.out_dir)
    write_jsonl(out / "samples.jsonl", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
