"""Async client for an OpenAI-compatible chat-completions teacher (vLLM's server, a hosted API).

Trace generation (docs/recipes.md §1, §3: o3-mini traces for Phi-4-reasoning, R1 rollouts for
Phi-4-mini-reasoning) spends hours talking to a teacher, so every transient failure is
retried: 429, 5xx, timeouts and dropped connections, with exponential backoff plus jitter
and the server's Retry-After honoured (up to `max_backoff`). Requests in flight are
bounded by a semaphore.
Reasoning comes back either in a `reasoning_content` / `reasoning` field (R1 style) or
inside the content; both are returned untouched for `distill.normalize` to split.
Every stage that talks to such a server (trace generation, the judge of judge-pairs)
takes its `EndpointConfig` keys and runs its requests through `drain`.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Awaitable, Callable, Iterable

import httpx
from pydantic import Field

from reason.config import Section

# Auth, permission and unknown-model errors would fail every request the same way.
FATAL_STATUS = {401, 403, 404}


class TeacherError(RuntimeError):
    """A request that failed for good; `fatal` means no later request can succeed either."""

    def __init__(self, msg: str, reason: str, fatal: bool = False):
        super().__init__(msg)
        self.reason, self.fatal = reason, fatal


@dataclass(frozen=True)
class Choice:
    content: str
    reasoning: str | None  # the separate reasoning field, when the server sends one
    finish_reason: str | None


def backoff_delay(attempt: int, base: float, cap: float, u: float) -> float:
    """Delay before retry `attempt` (0-based): base*2^attempt capped at `cap`, jittered by u in [0, 1).

    Equal jitter keeps at least half the exponential delay, so a crowd of workers spreads
    out without any of them retrying at once.
    >>> backoff_delay(3, 1.0, 60.0, 0.0)
    4.0
    """
    d = min(cap, base * 2**attempt)
    return d * (0.5 + 0.5 * u)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = now or datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())


def parse_choices(data: Any) -> list[Choice]:
    """The choices of a chat-completions response, in index order; ValueError when it is not that shape
    (a server's body is untrusted: a wrong type is a bad response, retried, never a crash)."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ValueError("response has no 'choices' list")
    choices = data["choices"]
    if not all(isinstance(ch, dict) and isinstance(ch.get("message") or {}, dict)
               and isinstance(ch.get("index", 0), int) for ch in choices):
        raise ValueError("a choice is not an object with an integer index and a message object")
    out = []
    for ch in sorted(choices, key=lambda c: c.get("index", 0)):
        msg = ch.get("message") or {}
        # vLLM used `reasoning_content` (as DeepSeek's API does); newer servers say `reasoning`.
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        fields = (msg.get("content") or "", reasoning or None, ch.get("finish_reason"))
        if not all(f is None or isinstance(f, str) for f in fields):
            raise ValueError("a choice's content, reasoning or finish_reason is not text")
        out.append(Choice(*fields))
    return out


class TeacherClient:
    """Chat completions with bounded concurrency and retries, from EndpointConfig.client; use as `async with`."""

    def __init__(self, base_url: str, model: str, api_key: str | None, *, concurrency: int, retries: int,
                 timeout: float, backoff: float, max_backoff: float, seed: int):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random(seed)  # jitter only; seeded so a test run is repeatable
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self._http.aclose()

    async def chat(self, messages: list[dict], *, n: int, temperature: float, top_p: float, max_tokens: int,
                   seed: int | None = None, extra: dict | None = None) -> list[Choice]:
        """Ask for `n` completions of `messages`; the server may return fewer than asked.

        `extra` is merged into the request body last; a key set to None is removed (e.g.
        `max_tokens: null` with `max_completion_tokens` for APIs that renamed it).
        """
        body = {"model": self.model, "messages": messages, "n": n, "temperature": temperature,
                "top_p": top_p, "max_tokens": max_tokens, "seed": seed, **(extra or {})}
        body = {k: v for k, v in body.items() if v is not None}
        async with self._sem:
            return await self._post(body)

    async def _post(self, body: dict) -> list[Choice]:
        for attempt in range(self.retries + 1):
            wait, reason = None, None
            try:
                resp = await self._http.post(self.url, json=body)
            except httpx.TimeoutException:
                reason = "timeout"
            except httpx.TransportError as e:  # refused, reset, closed mid-response
                reason = f"connection: {type(e).__name__}"
            else:
                if resp.status_code == 200:
                    try:
                        return parse_choices(resp.json())
                    except (json.JSONDecodeError, ValueError) as e:
                        reason = f"bad response: {e}"
                elif resp.status_code == 429 or resp.status_code >= 500:
                    reason = f"http {resp.status_code}"
                    wait = parse_retry_after(resp.headers.get("retry-after"))
                else:
                    status = resp.status_code
                    raise TeacherError(f"{self.url}: HTTP {status}: {resp.text[:500]}",
                                       f"http {status}", fatal=status in FATAL_STATUS)
            if attempt == self.retries:
                break
            if wait is None:
                wait = backoff_delay(attempt, self.backoff, self.max_backoff, self._rng.random())
            # Capped: a huge Retry-After must not park a worker for hours.
            await asyncio.sleep(min(wait, self.max_backoff))
        raise TeacherError(f"{self.url}: gave up after {self.retries + 1} attempts ({reason})", reason)


class EndpointConfig(Section):
    """An OpenAI-compatible server, and how hard to try it (the keys every stage that talks to one shares)."""

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # env var holding the key; unset var: no auth header
    concurrency: int = Field(8, ge=1)  # requests in flight
    retries: int = Field(5, ge=0)  # per request, on 429 / 5xx / timeouts / dropped connections
    timeout: float = Field(600.0, gt=0.0)  # seconds per request
    backoff: float = Field(1.0, ge=0.0)  # first retry waits ~backoff s, doubling up to max_backoff
    max_backoff: float = Field(60.0, ge=0.0)

    def client(self, model: str, seed: int = 0) -> TeacherClient:
        """A client for `model` on this endpoint (use as `async with`); `seed` seeds the retry jitter."""
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return TeacherClient(self.base_url, model, api_key, concurrency=self.concurrency, retries=self.retries,
                             timeout=self.timeout, backoff=self.backoff, max_backoff=self.max_backoff, seed=seed)


async def drain(jobs: Iterable, workers: int, handle: Callable[[Any], Awaitable[None]]) -> None:
    """`await handle(job)` for every job, `workers` at a time; an error in one (a fatal
    TeacherError) cancels the others and is raised."""
    queue = iter(jobs)  # workers pull from one iterator, so at most `workers` jobs are live

    async def worker():
        for job in queue:
            await handle(job)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
