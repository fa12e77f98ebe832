"""`reason eval`: sample n answers per problem, verify them, report pass@k and friends.

The Phi-4 protocol (RECIPES.md section 2): pass@1 averaged over n samples per
problem (5 by default), temperature 0.8, top_p 0.95. Beside pass@1 the summary
gives unbiased pass@k and maj@k, response length in tokens, the truncation rate
and the format-violation rate, overall and per source, and records the model, n,
seed and every sampling parameter so a score can be reproduced (RECIPES.md
section 4: "pass@1 that cannot be reproduced"). Same config and seed -> same numbers.
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
from reason.passk import maj_at_k, pass1_mean, pass_at_k
from reason.records import Problem, write_jsonl
from rewards.registry import RewardConfig, RewardTerm


class ProblemSet(Section):
    """Where the problems come from: a file (JSONL, Parquet, dataset dir) or "synthetic"."""

    path: str = "synthetic"
    fields: dict[str, str] = Field(default_factory=dict)  # column overrides: prompt / ground_truth / id
    n: PositiveInt = 50  # synthetic only
    seed: int = 0  # synthetic only
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5])  # synthetic only
    limit: PositiveInt | None = None  # keep only the first `limit` problems


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
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    engine: Literal["vllm", "hf", "auto"] = "auto"
    problems: ProblemSet = Field(default_factory=ProblemSet)
    chat: ChatConfig = Field(default_factory=ChatConfig)
    sampling: EvalSampling = Field(default_factory=EvalSampling)
    reward: EvalReward = Field(default_factory=EvalReward)
    out_dir: str = "runs/eval"


def load_eval_problems(ps: ProblemSet) -> list[Problem]:
    if ps.path == "synthetic":
        from distill.synthetic import generate_problems

        problems = generate_problems(ps.n, ps.seed, tuple(ps.levels))
    else:
        from distill.problems import load_problems

        problems = load_problems(ps.path, ps.fields or None)
    return problems[:ps.limit] if ps.limit else problems


def ks_for(n: int) -> list[int]:
    """The k of pass@k / maj@k: powers of two up to n, and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def _acc(components: dict | None) -> float | None:
    if components is None:
        return None
    found = [v for k, v in components.items() if k == "acc" or k.endswith("/acc")]
    if not found:
        raise ValueError(f"the reward gives no 'acc' component ({sorted(components)}); "
                         "eval needs a correctness verdict: add the 'accuracy' reward term")
    return found[0]


def sample_rows(problems: list[Problem], samples: list[list[Sample]], chat: ChatConfig,
                reward: RewardConfig) -> list[dict]:
    """Score every sample; one row per sample with its verdict, answer and format check."""
    from rewards.format import parse_think
    from rewards.math import extract_answer
    from rewards.score import ScoreSample, score_samples

    flat = [(j, p, i, s) for j, (p, group) in enumerate(zip(problems, samples)) for i, s in enumerate(group)]
    to_score = [ScoreSample(completion=s.text, ground_truth=p.ground_truth, num_tokens=s.num_tokens,
                            finish_reason=s.finish_reason, source=p.source, id=p.id) for _, p, _, s in flat]
    scored, _ = score_samples(to_score, reward.terms, reward.workers, reward.timeout)
    rows = []
    for (j, p, i, s), out in zip(flat, scored):
        head, sep, tail = s.text.rpartition(chat.think_close)  # grade what follows the reasoning
        acc = _acc(out["components"])
        rows.append({
            "problem": j, "id": p.id, "source": p.source, "sample": i, "ground_truth": p.ground_truth,
            "answer": extract_answer(tail if sep else s.text),
            "correct": None if acc is None else acc > 0.5,
            "format_ok": parse_think(s.text, chat.think_open, chat.think_close).ok,
            "num_tokens": s.num_tokens, "finish_reason": s.finish_reason,
            "status": out["status"], "score": out["score"], "components": out["components"],
            "completion": s.text,
        })
    return rows


def metrics(groups: list[list[dict]], n: int) -> dict:
    """Summary numbers over problems (each a list of its n sample rows)."""
    rows = [r for g in groups for r in g]
    scored = [g for g in groups if g[0]["correct"] is not None]  # no usable gold: no verdict
    out = {"problems": len(groups), "scored_problems": len(scored), "samples": len(rows)}
    verdicts = [[r["correct"] for r in g] for g in scored]
    for k in ks_for(n):
        out[f"pass@{k}"] = _mean(pass1_mean(v) if k == 1 else pass_at_k(n, sum(v), k) for v in verdicts)
    for k in ks_for(n):
        out[f"maj@{k}"] = _mean(maj_at_k([r["answer"] for r in g], v, k) for g, v in zip(scored, verdicts))
    lengths = [r["num_tokens"] for r in rows]
    out["mean_tokens"] = _mean(lengths)
    out["median_tokens"] = statistics.median(lengths) if lengths else None
    out["truncation_rate"] = _mean(r["finish_reason"] == "length" for r in rows)
    out["format_violation_rate"] = _mean(not r["format_ok"] for r in rows)
    out["verification_timeouts"] = sum(r["status"] == "timeout" for r in rows)
    out["mean_score"] = _mean(r["score"] for r in rows if r["score"] is not None)
    return out


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None


def summarize(rows: list[dict], n: int) -> dict:
    """Overall and per-source metrics from the per-sample rows (problems in row order)."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["problem"], []).append(r)
    by_source: dict[str, list[list[dict]]] = {}
    for g in groups.values():
        by_source.setdefault(g[0]["source"], []).append(g)
    return {"overall": metrics(list(groups.values()), n),
            "by_source": {s: metrics(gs, n) for s, gs in sorted(by_source.items())}}


def run_eval(cfg: EvalConfig, engine: VLLMEngine | HFEngine | None = None) -> dict:
    """Run the eval; write `samples.jsonl` and `summary.json` to cfg.out_dir; return the summary.

    Pass `engine` to evaluate a live one (e.g. the GRPO policy's); else one is built from cfg.model.
    """
    from reason.models import resolve

    problems = load_eval_problems(cfg.problems)
    if not problems:
        raise ValueError(f"no problems to evaluate in {cfg.problems.path}")
    model_dir = resolve(cfg.model)
    sp = cfg.sampling
    if engine is None:
        from reason.models import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        longest = max(len(tokenizer.encode(render_prompt(tokenizer, p.prompt, cfg.chat), add_special_tokens=False))
                      for p in problems)
        engine = make_engine(cfg.engine, model_dir, cfg.dtype, seed=sp.seed or 0,
                             max_model_len=longest + sp.max_tokens)
    prompts = [render_prompt(engine.tokenizer, p.prompt, cfg.chat) for p in problems]
    rows = sample_rows(problems, engine.generate(prompts, sp, progress=True), cfg.chat, cfg.reward)
    summary = {
        "model": str(model_dir), "engine": type(engine).__name__, "dtype": cfg.dtype,
        "n": sp.n, "seed": sp.seed, "sampling": sp.model_dump(mode="json"),
        **summarize(rows, sp.n), "config": cfg.model_dump(mode="json"),
    }
    out = Path(cfg.out_dir)
    write_jsonl(out / "samples.jsonl", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
