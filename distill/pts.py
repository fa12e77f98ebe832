"""`reason distill pts`: Pivotal Token Search pairs from the model being trained (Phi-4's first DPO round).

Phi-4 (arXiv 2412.08905, section 4.3; docs/recipes.md §5; the search is distill.pivotal): each
problem's p(success | Q) is estimated from `samples` completions, each verified by the killable
verifier; only problems with `band` = [0.2, 0.8] are searched (the paper's band), on `solutions`
of those completions. Not published in the paper, so configuration here: `p_gap` and `samples`
(defaults 0.2 and 10, the public PTS tool's).

Prefixes are token ids: a completion is sampled from the prompt's ids plus the solution's ids
(vLLM's prompt token ids, HF generate's input_ids), never from decoded text. Problems are searched
`batch` at a time, each round of their searches one engine call seeded from (seed, the batch's first
problem, round), so a batch's pairs depend on nothing outside it. A finished batch is one line of the
log (`--log`, appended); a killed run resumes at the first batch the log lacks, and the pairs file is
rewritten whole from the log. The report counts problems searched and skipped (by the band, or
unverifiable), pivots, the Δp histogram, and estimates spent against a token-by-token scan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import Field, model_validator

from distill.filters import VerifyOptions, verify_scorer
from distill.generate import request_seed
from distill.pairs import TokenPair
from distill.pivotal import PivotSearch, pick_pair, scan_cost
from distill.select import SCORED, Band, pass_rate, rate_histogram
from reason.chat import ChatConfig, render_prompt
from reason.config import Section
from reason.console import progress
from reason.errors import UserError
from reason.passk import band_verdict
from reason.records import JsonlAppender, Problem, Record, RecordError, log_beside, read_numbered, write_jsonl


class PTSConfig(Section):
    engine: Literal["auto", "vllm", "hf"] = "auto"  # auto: vLLM when installed, else HF generate
    model: str = "default"  # the model being trained, a directory ("default": the embedded SmolLM2)
    p_gap: float = Field(0.2, gt=0.0, le=1.0)  # not published in Phi-4; the public PTS tool's 0.2
    samples: int = Field(10, ge=2)  # completions per estimate of p; not published; the public tool's 10
    band: Band = (0.2, 0.8)  # Phi-4: only problems with 0.2 <= p(success | Q) <= 0.8
    solutions: int = Field(1, ge=1)  # searched per problem: the first finished, verified p(success | Q) samples
    temperature: float = Field(1.0, gt=0.0)  # p(success) under the model's own distribution
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(2048, ge=1)  # per completion
    seed: int = 0
    batch: int = Field(8, ge=1)  # problems searched together: one engine call per round for all of them
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 where the hardware is fast at it
    gpu_memory_utilization: float = Field(0.2, gt=0.0, le=1.0)  # vllm; on CPU the share of RAM for KV cache
    bins: int = Field(10, ge=1)  # Δp histogram bins over [-1, 1]
    verify: VerifyOptions = Field(default_factory=VerifyOptions)
    chat: ChatConfig = Field(default_factory=ChatConfig)

    @model_validator(mode="after")
    def _solutions(self) -> "PTSConfig":
        if self.solutions > self.samples:
            raise ValueError(f"solutions {self.solutions} > samples {self.samples}: solutions are drawn "
                             "from the samples that estimate p(success | Q)")
        return self


SETTINGS = ("engine", "model", "p_gap", "samples", "band", "solutions", "temperature", "top_p", "max_tokens",
            "seed", "batch", "dtype", "chat")  # what a batch's result depends on; a resumed log must match


class ProblemSearch(Record):
    """What the search of one problem found."""

    problem_id: str
    status: Literal["searched", "too_easy", "too_hard", "bad_gold", "unverified", "no_solution"]
    p: float | None = None  # p(success | Q)
    estimates: int = 0  # prefixes sampled, `samples` completions each
    scan: int = 0  # prefixes a token-by-token scan of the same solutions would sample
    pivots: list[dict[str, Any]] = Field(default_factory=list)  # solution, position, token, p_before, p_after
    pairs: list[TokenPair] = Field(default_factory=list)


class SearchBatch(Record):
    """One line of the log: `batch` problems from position `start`, searched together."""

    start: int
    ids: list[str]
    settings: dict[str, Any]
    problems: list[ProblemSearch]


class Estimate(NamedTuple):
    p: float | None  # None: no completion could be verified
    completions: list[tuple[list[int], bool | None]]  # token ids, verified correct (None: unverifiable)
    statuses: list[str]


@dataclass
class _Problem:
    """One problem's search in progress."""

    problem: Problem
    prompt_ids: list[int]
    memo: dict[tuple[int, ...], Estimate] = field(default_factory=dict)  # by token-id prefix
    solutions: list[list[int]] = field(default_factory=list)
    searches: list[PivotSearch] = field(default_factory=list)
    result: ProblemSearch | None = None  # set once the problem is finished


# ---------------------------------------------------------------- sampling and verifying

class _Sampler:
    def __init__(self, engine, scorer, cfg: PTSConfig):
        self.engine, self.scorer, self.cfg = engine, scorer, cfg
        self.eos = engine.tokenizer.eos_token_id

    def text(self, ids: list[int]) -> str:
        """A response's text for the verifier (never fed back to the model)."""
        ids = ids[:-1] if ids and ids[-1] == self.eos else ids
        return self.engine.tokenizer.decode(ids, skip_special_tokens=False)

    def estimate(self, requests: list[tuple[_Problem, tuple[int, ...]]], seed: int) -> list:
        """Sample and verify `samples` completions of each (problem, prefix); memoise the estimates.
        Returns the engine's samples per request (the first round's become the solutions)."""
        from reason.engine import SamplingConfig

        cfg = self.cfg
        sp = SamplingConfig(n=cfg.samples, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=cfg.max_tokens, seed=seed)
        outs = self.engine.generate([st.prompt_ids + list(prefix) for st, prefix in requests], sp)
        items = [(self.text(list(prefix) + s.token_ids), st.problem.ground_truth)
                 for (st, prefix), group in zip(requests, outs) for s in group]
        statuses = iter(self.scorer.verify(items))
        for (st, prefix), group in zip(requests, outs):
            mine = [next(statuses) for _ in group]
            verdicts = [s == "correct" if s in SCORED else None for s in mine]
            st.memo[prefix] = Estimate(pass_rate(mine), [(s.token_ids, v) for s, v in zip(group, verdicts)], mine)
        return outs


def _begin(st: _Problem, samples: list, cfg: PTSConfig) -> None:
    """After p(success | Q): the band check, then the solutions to search."""
    root = st.memo[()]
    if root.p is None:
        skip = "bad_gold" if "bad_gold" in root.statuses else "unverified"
    else:
        verdict = band_verdict(root.p, cfg.band)  # (too_hard | too_easy, why), or None inside the band
        skip = verdict and verdict[0]
    if skip is None:
        for s, (_, ok) in zip(samples, root.completions):
            if len(st.solutions) < cfg.solutions and s.finish_reason == "stop" and ok is not None:
                st.solutions.append(list(s.token_ids))
                st.searches.append(PivotSearch.start(s.logprobs, cfg.p_gap, root.p, 1.0 if ok else 0.0))
        skip = None if st.solutions else "no_solution"
    if skip is not None:
        st.result = ProblemSearch(problem_id=st.problem.id, status=skip, p=root.p, estimates=1, scan=1)


def _wanted(st: _Problem) -> list[tuple[int, ...]]:
    """The prefixes this problem's searches need next and the memo lacks, each once, in order."""
    out: dict[tuple[int, ...], None] = {}
    for sol, search in zip(st.solutions, st.searches):
        for k in search.wanted():
            if tuple(sol[:k]) not in st.memo:
                out[tuple(sol[:k])] = None
    return list(out)


def _advance(st: _Problem) -> None:
    """Feed every search the estimates it asked for; a prefix nothing could verify ends the problem."""
    for sol, search in zip(st.solutions, st.searches):
        if search.done:
            continue
        found = {k: st.memo[tuple(sol[:k])].p for k in search.wanted()}
        if any(p is None for p in found.values()):
            st.result = ProblemSearch(problem_id=st.problem.id, status="unverified", p=st.memo[()].p,
                                      estimates=len(st.memo), scan=scan_cost(st.solutions))
            return
        search.advance(found)


def _finish(st: _Problem, sampler: _Sampler, cfg: PTSConfig) -> ProblemSearch:
    """The pivots of every solution (each (prefix, token) once) and their pairs."""
    pivots, pairs, seen = [], [], set()
    for n, (sol, search) in enumerate(zip(st.solutions, st.searches)):
        for k in search.pivots:
            prefix, token = tuple(sol[:k]), sol[k]
            if (prefix, token) in seen:
                continue
            seen.add((prefix, token))
            before, after = search.p[k], search.p[k + 1]
            pivots.append({"solution": n, "position": k, "token": token, "p_before": before, "p_after": after})
            picked = pick_pair(token, before, after, st.memo[prefix].completions)
            if picked is None:
                continue
            chosen, rejected, other = picked
            decode = sampler.engine.tokenizer.decode
            pairs.append(TokenPair(
                problem_id=st.problem.id, prompt_ids=st.prompt_ids, prefix_ids=list(prefix),
                prefix=decode(list(prefix), skip_special_tokens=False),
                chosen_id=chosen, chosen=decode([chosen], skip_special_tokens=False),
                rejected_id=rejected, rejected=decode([rejected], skip_special_tokens=False),
                p_before=before, p_after=after,
                metadata={"position": k, "solution": n, "pivot": "chosen" if chosen == token else "rejected",
                          "other_rate": other.rate, "other_count": other.count, "samples": cfg.samples,
                          "model": cfg.model}))
    return ProblemSearch(problem_id=st.problem.id, status="searched", p=st.memo[()].p, estimates=len(st.memo),
                         scan=scan_cost(st.solutions), pivots=pivots, pairs=pairs)


def search_batch(problems: list[Problem], start: int, engine, scorer, cfg: PTSConfig) -> SearchBatch:
    """Search `problems` (positions start.. of the run) together, a round at a time."""
    sampler = _Sampler(engine, scorer, cfg)
    tok = engine.tokenizer
    states = [_Problem(p, tok.encode(render_prompt(tok, p.prompt, cfg.chat), add_special_tokens=False))
              for p in problems]
    outs = sampler.estimate([(st, ()) for st in states], request_seed(cfg.seed, f"pts:{start}", 0))
    for st, samples in zip(states, outs):
        _begin(st, samples, cfg)
    round_ = 1
    while live := [st for st in states if st.result is None and not all(s.done for s in st.searches)]:
        requests = [(st, prefix) for st in live for prefix in _wanted(st)]
        if requests:
            sampler.estimate(requests, request_seed(cfg.seed, f"pts:{start}", round_))
        for st in live:
            _advance(st)
        round_ += 1
    results = [st.result or _finish(st, sampler, cfg) for st in states]
    return SearchBatch(start=start, ids=[p.id for p in problems], settings=settings(cfg), problems=results)


def search_batches(batches: list[tuple[int, list[Problem]]], cfg: PTSConfig, on_batch=None) -> list[SearchBatch]:
    """Search each (start, problems) batch; `on_batch(result)` as each finishes. One engine for all."""
    from reason.engine import engine_dtype, make_engine
    from reason.models import resolve

    if not batches:
        return []
    engine = make_engine(cfg.engine, resolve(cfg.model, "model"), engine_dtype(cfg.dtype), seed=cfg.seed,
                         gpu_memory_utilization=cfg.gpu_memory_utilization)
    out = []
    with verify_scorer(cfg.verify, cfg.chat) as scorer:
        for start, mine in batches:
            out.append(search_batch(mine, start, engine, scorer, cfg))
            if on_batch:
                on_batch(out[-1])
    return out


# ---------------------------------------------------------------- the log, the run, the report

def settings(cfg: PTSConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", include=set(SETTINGS))


def check_problems(problems: list[Problem]) -> None:
    seen = set()
    for p in problems:
        if p.id in seen:
            raise UserError(f"duplicate problem id {p.id!r}: the log and the pairs would mix them")
        if p.ground_truth is None or not str(p.ground_truth).strip():
            raise UserError(f"problem {p.id!r} has no ground_truth: PTS verifies every completion against it")
        seen.add(p.id)


def read_log(path: str | Path, problems: list[Problem], cfg: PTSConfig) -> dict[int, SearchBatch]:
    """The batches already searched, by start; a log of other problems or settings is refused by line."""
    if not Path(path).exists():
        return {}
    want = settings(cfg)
    done = {}
    for n, b in read_numbered(path, SearchBatch):
        ids = [p.id for p in problems[b.start:b.start + cfg.batch]]
        if b.ids != ids:
            raise RecordError(path, n, f"the batch at problem {b.start} holds {b.ids[:3]}..., the problems have "
                                       f"{ids[:3]}... there: resume with the same problems and batch, or a new --log")
        if b.settings != want:
            keys = sorted(k for k in want if b.settings.get(k) != want[k])
            raise RecordError(path, n, f"written with other settings ({', '.join(keys)}): resume with the same "
                                       "config, or a new --log")
        done[b.start] = b
    return done


def missing_batches(problems: list[Problem], done: dict[int, SearchBatch], size: int
                    ) -> list[tuple[int, list[Problem]]]:
    """(start, problems) of every batch the log lacks, in order."""
    return [(s, problems[s:s + size]) for s in range(0, len(problems), size) if s not in done]


@dataclass
class PTSReport:
    problems: int
    done_before: int  # problems already in the log when this run started
    searched: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # status -> problems (too_easy, too_hard, ...)
    pivots: int = 0
    pairs: int = 0
    unpaired: int = 0  # pivots with no sampled first token on the other side of p
    estimates: int = 0  # prefixes sampled by the search, `samples` completions each
    completions: int = 0
    scan_estimates: int = 0  # prefixes a token-by-token scan of the same solutions would have sampled
    delta_bins: int = 10
    delta_histogram: list[int] = field(default_factory=list)  # Δp = p_after - p_before over [-1, 1]


def summarise(batches: list[SearchBatch], problems: int, done_before: int, cfg: PTSConfig) -> PTSReport:
    r = PTSReport(problems=problems, done_before=done_before, delta_bins=cfg.bins)
    deltas = []
    for res in (res for b in batches for res in b.problems):
        if res.status == "searched":
            r.searched += 1
        else:
            r.skipped[res.status] = r.skipped.get(res.status, 0) + 1
        r.pivots += len(res.pivots)
        r.pairs += len(res.pairs)
        r.estimates += res.estimates
        r.scan_estimates += res.scan
        deltas += [(v["p_after"] - v["p_before"] + 1.0) / 2.0 for v in res.pivots]  # [-1, 1] -> [0, 1]
    r.unpaired, r.completions = r.pivots - r.pairs, r.estimates * cfg.samples
    r.delta_histogram = rate_histogram(deltas, cfg.bins)
    return r


def pivotal_pairs(problems: list[Problem], out_path: str | Path, cfg: PTSConfig,
                  log_path: str | Path | None = None) -> PTSReport:
    """Search every problem the log lacks, then write all the log's pairs to `out_path` (whole)."""
    from reason.models import resolve

    check_problems(problems)
    log_path = log_path or log_beside(out_path)
    resolve(cfg.model, "model")  # a bad path fails before the log is touched
    with JsonlAppender(log_path) as log:  # opening first trims a line torn by a killed run
        done = read_log(log_path, problems, cfg)
        before = sum(len(b.ids) for b in done.values())
        todo = missing_batches(problems, done, cfg.batch)
        with progress() as bar:
            task = bar.add_task(f"pivotal tokens ({cfg.engine})", total=len(problems), completed=before)

            def keep(batch: SearchBatch) -> None:
                log.write(batch)
                done[batch.start] = batch
                bar.advance(task, len(batch.ids))

            search_batches(todo, cfg, keep)
    return write_pairs(out_path, done, len(problems), before, cfg)


def write_pairs(out_path: str | Path, done: dict[int, SearchBatch], problems: int, before: int,
                cfg: PTSConfig) -> PTSReport:
    """Every pair of the log's batches, in problem order, written whole; and the report over all of them."""
    batches = [done[s] for s in sorted(done)]
    write_jsonl(out_path, (pair for b in batches for res in b.problems for pair in res.pairs))
    return summarise(batches, problems, before, cfg)
