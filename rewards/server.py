"""A reward server: `reason` rewards over HTTP for trainers that call one (OpenRLHF's remote RM).

Endpoints:
  POST /get_reward  OpenRLHF's remote reward protocol: {"query": [prompt + response, ...],
                    "prompts": [...], "labels": [ground truth, ...]} -> {"rewards": [...],
                    "scores": [...], "extra_logs": {component: [...]}}. The response is the query
                    after its prompt; it stopped if it ends with the tokenizer's EOS, and its
                    length is counted in that tokenizer's tokens.
  POST /score       the records `reason reward score` reads: {"samples": [{completion,
                    ground_truth, num_tokens, finish_reason, ...}]} -> {"rows": [...]}.
  GET  /health      {"status": "ok", "pending": items being scored, "workers": n}.

Every item is scored in the killable workers of one `rewards.score.Scorer`, shared by all
requests, so a hostile item holds one worker until its timeout and the rest go on. Limits
(body size: 413, items per request: 413, items queued: 429 with Retry-After, a deadline
per request: 504) all have safe defaults. A bearer token, compared in constant time, is
optional on loopback and required anywhere else; a refused request gets 401 and no
detail. Bad input is a 4xx naming the field, never a 500. SIGTERM lets in-flight requests
finish (uvicorn's graceful shutdown), then stops the workers.
"""
import asyncio  # no `from __future__ import annotations`: FastAPI reads the handlers' annotations
import hmac
import json
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rewards.registry import RewardError, RewardTerm
from rewards.score import Scorer, ScoreSample

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeConfig(BaseModel):
    """The server's reward terms, workers and limits (`reason reward serve --config`)."""

    model_config = ConfigDict(extra="forbid")
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="phi4_plus")])
    workers: int | None = None  # default: one per CPU core
    timeout: float = Field(10.0, gt=0)  # seconds per item, then its worker is killed
    think_open: str = "<think>"
    think_close: str = "</think>"
    tokenizer: str | None = None  # counts tokens and finds the EOS for /get_reward
    max_body_bytes: int = Field(8 * 2**20, gt=0)
    max_items: int = Field(1024, gt=0)  # per request
    max_queue: int = Field(8192, gt=0)  # items scoring at once, all requests together
    deadline: float = Field(600.0, gt=0)  # seconds a request may take
    retry_after: int = Field(5, ge=1)  # seconds, in the 429 answer when the queue is full


class OpenRLHFRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: list[str]
    prompts: list[str]
    labels: list[str | int | float | None] | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[ScoreSample]


class HTTPProblem(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


def check_bind(host: str, token: str | None) -> None:
    """Anything but loopback needs a token: the scores steer a training run."""
    if host not in LOOPBACK and not token:
        raise RewardError(f"--host {host}: serving beyond loopback needs a bearer token (--token-env)")


def openrlhf_samples(req: OpenRLHFRequest, tokenizer) -> list[dict]:
    """The responses of an OpenRLHF request as score records: text after the prompt, EOS, length."""
    if len(req.query) != len(req.prompts) or (req.labels is not None and len(req.labels) != len(req.query)):
        raise HTTPProblem(422, f"query, prompts and labels differ in length: {len(req.query)}, {len(req.prompts)}, "
                               f"{len(req.labels or [])}")
    if tokenizer is None:
        raise HTTPProblem(422, "query: counting a response's tokens needs the server started with --tokenizer")
    eos = tokenizer.eos_token or ""
    tail = {t for t in (eos, tokenizer.pad_token) if t}
    out = []
    for i, (query, prompt) in enumerate(zip(req.query, req.prompts)):
        if not query.startswith(prompt):
            raise HTTPProblem(422, f"query[{i}]: does not start with prompts[{i}]")
        text, stopped = query[len(prompt):], False
        while any(text.endswith(t) for t in tail):  # OpenRLHF decodes with special tokens kept
            stopped = stopped or text.endswith(eos)
            text = text[:-len(next(t for t in tail if text.endswith(t)))]
        n = len(tokenizer.encode(text, add_special_tokens=False)) + int(stopped)  # the EOS is a token of it
        gold = None if req.labels is None or req.labels[i] is None else str(req.labels[i])
        out.append({"completion": text, "ground_truth": gold, "num_tokens": n,
                    "finish_reason": "stop" if stopped else "length"})
    return out


def create_app(cfg: ServeConfig, token: str | None = None):
    """The FastAPI app; the Scorer starts with the app and stops after its last request."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        state["scorer"] = Scorer(cfg.terms, cfg.workers, cfg.timeout, cfg.think_open, cfg.think_close)
        if cfg.tokenizer:
            from transformers import AutoTokenizer

            state["tokenizer"] = AutoTokenizer.from_pretrained(cfg.tokenizer)
        try:
            yield
        finally:
            state["scorer"].close()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPProblem)
    async def problem(request, exc: HTTPProblem):
        body = {} if exc.status == 401 else {"detail": exc.detail}
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    async def body_of(request: Request, model: type[BaseModel]) -> BaseModel:
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                raise HTTPProblem(401, "")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise HTTPProblem(413, f"body: {declared} bytes, more than max_body_bytes {cfg.max_body_bytes}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise HTTPProblem(413, f"body: more than max_body_bytes {cfg.max_body_bytes}")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPProblem(400, f"body: not valid JSON ({e})") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or "body"
            raise HTTPProblem(422, f"{field}: {err['msg']}") from None

    async def scored(samples: list) -> list[dict]:
        if len(samples) > cfg.max_items:
            raise HTTPProblem(413, f"{len(samples)} items, more than max_items {cfg.max_items}")
        scorer: Scorer = state["scorer"]
        if scorer.service.pending() + len(samples) > cfg.max_queue:
            raise HTTPProblem(429, f"queue full: {scorer.service.pending()} items scoring",
                              {"Retry-After": str(cfg.retry_after)})
        try:
            rows, _ = await asyncio.wait_for(asyncio.to_thread(scorer.score, samples), cfg.deadline)
        except asyncio.TimeoutError:
            raise HTTPProblem(504, f"deadline: not scored within {cfg.deadline:g} s") from None
        except RewardError as e:
            raise HTTPProblem(422, str(e)) from None
        return rows

    @app.get("/health")
    async def health():
        scorer: Scorer = state["scorer"]
        return {"status": "ok", "pending": scorer.service.pending(), "workers": scorer.service.pool.size}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        req = await body_of(request, OpenRLHFRequest)
        rows = await scored(openrlhf_samples(req, state.get("tokenizer")))
        scores = [0.0 if r["score"] is None else r["score"] for r in rows]  # OpenRLHF has no "skip"
        keys = sorted({k for r in rows if r["components"] for k in r["components"] if k != "score"})
        logs = {k: [(r["components"] or {}).get(k, 0.0) for r in rows] for k in keys}
        logs["skipped"] = [float(r["components"] is None) for r in rows]
        logs["timeout"] = [float(r["status"] == "timeout") for r in rows]
        return {"rewards": scores, "scores": scores, "extra_logs": logs}

    @app.post("/score")
    async def score(request: Request):
        req = await body_of(request, ScoreRequest)
        return {"rows": await scored([s.model_dump(exclude_none=True) for s in req.samples])}

    return app


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, token: str | None = None) -> None:
    """Serve until SIGTERM or Ctrl-C; in-flight requests finish first."""
    import uvicorn

    check_bind(host, token)
    uvicorn.run(create_app(cfg, token), host=host, port=port, log_level="info", access_log=True,
                timeout_graceful_shutdown=int(cfg.deadline))
