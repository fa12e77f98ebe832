"""The filters `reason distill filter` runs, chosen in a config and run in a fixed order.

arXiv 2504.21318 and 2504.21233 (docs/recipes.md §1, §3): decontaminated, well-formed, length-bounded,
verified (rejection sampling) and de-duplicated traces. The order is fixed, not
the order the filters were named in:
  decontam -> format -> length -> verify -> dedup
Cheap checks first, so the expensive verification sees fewer records; format
before verify so a cut-off trace is reported as `truncated`, not `no_answer`;
dedup last, so the copy kept from a group of duplicates is a verified one.
"""
from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

from pydantic import Field

from distill.dedup import DecontamOptions, DedupOptions, filter_contaminated, filter_duplicates
from distill.filters import (AnyRecord, Dropped, FilterReport, LengthOptions, VerifyOptions, filter_format,
                             filter_length, filter_verified, verify_scorer)
from reason.chat import ChatConfig
from reason.config import Section
from reason.errors import UserError
from reason.records import Problem

Step = Literal["decontam", "format", "length", "verify", "dedup"]
ORDER: tuple[Step, ...] = ("decontam", "format", "length", "verify", "dedup")


class FilterConfig(Section):
    apply: list[Step] = Field(default_factory=list)  # which filters run (always in ORDER)
    decontam: DecontamOptions = Field(default_factory=lambda: DecontamOptions(eval_files=[]))
    chat: ChatConfig = Field(default_factory=ChatConfig)  # the think tags `format` and `verify` look for
    length: LengthOptions = Field(default_factory=LengthOptions)
    tokenizer: str = "default"  # counts tokens for `length`: a model dir, or the embedded model's
    verify: VerifyOptions = Field(default_factory=VerifyOptions)
    dedup: DedupOptions = Field(default_factory=DedupOptions)


class ChainResult(NamedTuple):
    kept: list
    dropped: list[tuple[str, Dropped]]  # (filter name, dropped record)
    reports: list[FilterReport]  # one per filter run, in order


def _token_counter(tokenizer: str):
    from reason.models import load_tokenizer

    tok = load_tokenizer(tokenizer, "tokenizer")
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def _check(records: Sequence[AnyRecord], cfg: FilterConfig) -> None:
    """Fail before any work on a filter that cannot apply to these records."""
    if "decontam" in cfg.apply and not cfg.decontam.eval_files:
        raise UserError("the decontam filter needs evaluation files (decontam.eval_files)")
    response_only = [s for s in ("format", "verify") if s in cfg.apply]
    if response_only and any(isinstance(r, Problem) for r in records):
        raise UserError(f"the {' and '.join(response_only)} filter needs traces or rollouts, not problems")


def run_filters(records: Sequence[AnyRecord], cfg: FilterConfig) -> ChainResult:
    """Run the filters named in `cfg.apply`, each on what the previous one kept."""
    _check(records, cfg)
    def verify(recs):
        with verify_scorer(cfg.verify, cfg.chat) as scorer:
            return filter_verified(recs, scorer)

    run = {
        "decontam": lambda recs: filter_contaminated(recs, cfg.decontam),
        "format": lambda recs: filter_format(recs, cfg.chat),
        "length": lambda recs: filter_length(recs, cfg.length, _token_counter(cfg.tokenizer), cfg.chat),
        "verify": verify,
        "dedup": lambda recs: filter_duplicates(recs, cfg.dedup),
    }
    kept, dropped, reports = list(records), [], []
    for step in [s for s in ORDER if s in cfg.apply]:
        result = run[step](kept)
        kept = result.kept
        dropped += [(result.report.name, d) for d in result.dropped]
        reports.append(result.report)
    return ChainResult(kept, dropped, reports)
