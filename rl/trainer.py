"""The local GRPO trainer: Phi-4-reasoning-plus's RL stage and Phi-4-mini's stage 4, on one machine.

Each step (arXiv 2504.21318 and 2504.21233; docs/recipes.md §2, §3) draws prompts from a PromptSampler
whose position is checkpointed and rolls out G completions each at the annealed temperature (vLLM or
Hugging Face generate); killable reward workers score them while the frozen reference scores the same
tokens. The Phi-4-mini stabilisers (pass-rate filtering, DAPO dynamic sampling, rebalancing; rl.sampling)
shape the batch of group-relative advantages, rl.step runs `algorithm.epochs` AdamW steps, and the new
weights are pushed into the engine, verified. The learning rate warms up linearly over
`optim.warmup_steps`, then follows `optim.schedule` (Phi-4-plus: lr 5e-8, 10 warm-up steps).

`train_grpo(cfg)` is the whole run; `reason rl train` is a thin layer over it. A script that uses vLLM
must call it under `if __name__ == "__main__":`. Outputs in train.out_dir: config.yaml, metrics.jsonl,
samples.jsonl, checkpoints/step-N (model, optimizer, scheduler, RNG, prompt-sampler position; resume is
exact), final/ (Hugging Face safetensors).

With `model.lora` (peft) only the adapters train and reach AdamW; the KL reference is the policy with its
adapters disabled (no second copy), and the engine and final/ get the merged weights (base + adapter delta).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from reason.checkpoint import export_model
from reason.config import dump_config
from reason.console import console
from reason.engine import HFEngine, SamplingConfig, make_engine
from reason.errors import UserError
from reason.models import (adapters_disabled, is_peft, load_model, load_pretrained, load_tokenizer, merged_state_dict,
                           resolve)
from reason.passk import band_verdict
from reason.problems import load_source
from reason.records import JsonlAppender, existing, read_jsonl, write_jsonl
from reason.tracker import Tracker
from reason.train import (TrainResult, autocast, build_optimizer, build_scheduler, check_weights_dtype,
                          compute_dtype, keep_freed_blocks, pick_device, resume_state, save_state)
from rl.config import GRPOConfig
from rl.losses import group_advantages
from rewards.score import Scorer
from rl.packing import Row, micro_batches
from rl.rollout import Group, PromptSet, encode_prompts, group_rewards, rollout_metrics, sample_groups, score_groups
from rl.sampling import PromptSampler, keep_informative, rebalance, temperature_at
from rl.step import reference_logprobs, train_on_batch

TRUNCATION_WARNING = 0.9  # a too-small max length cuts every response, every reward is equal, the loss is 0


@dataclass
class Run:
    """Everything one GRPO run holds."""

    cfg: GRPOConfig
    lm: torch.nn.Module  # the policy, float32 master weights
    tokenizer: object
    ref: torch.nn.Module | None  # when kl_beta > 0: a frozen initial policy, or a LoRA lm itself (adapters off)
    engine: object  # reason.engine.VLLMEngine or HFEngine
    scorer: Scorer  # the recipe's reward terms and think tags, one pool for the run
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: PromptSampler
    train: PromptSet
    val: PromptSet | None
    device: torch.device
    dtype: torch.dtype  # compute precision: the engine samples in it, the update autocasts to it
    rewarding: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="reward"))

    def autocast(self):
        return autocast(self.dtype, self.device)


def _seed(*parts) -> int:
    """A stable 31-bit seed from the run seed, step and purpose (same on resume)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


# ---------------------------------------------------------------- set-up

def load_policy(cfg: GRPOConfig, run_dir: Path, device: torch.device):
    """The trainable policy (float32 master weights), its prepared tokenizer, and the directory engines load.

    When the chat format adds or renames tokens, the engine and the reference
    must see the prepared vocabulary, so the prepared initial policy is saved
    to RUN/policy-init and they load that instead of model.path.
    """
    path = resolve(cfg.model.path)
    vocab = load_tokenizer(path).get_vocab()
    lm, tokenizer = load_model(cfg.model, cfg.chat, device)
    engine_dir = path
    if tokenizer.get_vocab() != vocab:
        engine_dir = run_dir / "policy-init"
        if not engine_dir.is_dir():
            export_model(lm, tokenizer, engine_dir)
    return lm, tokenizer, engine_dir


def load_prompts(cfg: GRPOConfig, tokenizer) -> tuple[PromptSet, PromptSet | None]:
    """Train (and validation) problems, rendered and tokenized; says what was dropped."""
    sets = {}
    for split, src in (("train", cfg.data.train), ("validation", cfg.data.validation)):
        if src is None:
            continue
        sets[split] = encode_prompts(load_source(src, f"data.{split}"), tokenizer, cfg.chat,
                                     cfg.rollout.max_prompt_tokens)
        no_answer = sum(p.ground_truth in (None, "") for p in sets[split].problems)
        console.print(f"data: {split}: {len(sets[split].problems)} prompts")
        if sets[split].too_long:
            console.print(f"[yellow]data: {split}: dropped {sets[split].too_long} prompts longer than "
                          f"rollout.max_prompt_tokens={cfg.rollout.max_prompt_tokens}[/]")
        if no_answer:
            console.print(f"[yellow]data: {split}: {no_answer} problems have no ground truth; "
                          "rewards that need one skip their groups[/]")
    if not sets["train"].problems:
        raise UserError(f"data.train: no usable prompts in {cfg.data.train.describe()}")
    return sets["train"], sets.get("validation")


def _engine(cfg: GRPOConfig, engine_dir: Path, device: torch.device, dtype: torch.dtype):
    r = cfg.rollout
    engine = make_engine(r.engine, engine_dir, dtype=str(dtype).removeprefix("torch."), seed=cfg.train.seed,
                         gpu_memory_utilization=r.gpu_memory_utilization,
                         max_model_len=r.max_prompt_tokens + r.max_tokens)
    if isinstance(engine, HFEngine):  # vLLM places itself; HF generate runs on the trainer's device
        engine.model.to(device)
    return engine


def build_run(cfg: GRPOConfig, run_dir: Path) -> Run:
    for key, src in (("data.train", cfg.data.train), ("data.validation", cfg.data.validation)):
        if src is not None and src.path is not None:
            existing(src.path, key)  # before anything slow loads
    device = pick_device(cfg.train.device)
    keep_freed_blocks(device)
    check_weights_dtype(cfg.model.dtype, device)
    dtype = compute_dtype(cfg.train.autocast, device)  # a refused setting fails before anything loads
    torch.manual_seed(cfg.train.seed)  # rollouts have their own per-step seeds; this covers the rest
    lm, tokenizer, engine_dir = load_policy(cfg, run_dir, device)
    train, val = load_prompts(cfg, tokenizer)
    ref = None
    if cfg.algorithm.kl_beta > 0:  # a LoRA policy's base is its reference: no second copy
        ref = lm if is_peft(lm) else load_pretrained(engine_dir, dtype).to(device).eval().requires_grad_(False)
    optimizer = build_optimizer(lm, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    r = cfg.reward
    scorer = Scorer(r.terms, r.workers, r.timeout, cfg.chat.think_open, cfg.chat.think_close)
    return Run(cfg, lm, tokenizer, ref, _engine(cfg, engine_dir, device, dtype), scorer, optimizer, scheduler,
               PromptSampler(len(train.problems), cfg.data.seed), train, val, device, dtype)


# ---------------------------------------------------------------- one step

def _reference(run: Run, groups: list[Group], temperature: float) -> None:
    t = run.cfg.train
    rows = [Row(g.prompt_ids, s.token_ids, s.logprobs) for g in groups for s in g.samples]
    with adapters_disabled(run.ref) as ref:
        logps = iter(reference_logprobs(ref, rows, t.micro_batch, run.tokenizer.pad_token_id, temperature,
                                        run.autocast, t.micro_batch_tokens, t.logits_chunk))
    for g in groups:
        g.ref_logprobs = [next(logps) for _ in g.samples]


def correctness(groups: list[Group], key: str) -> torch.Tensor:
    """Bool [n*G]: each sample's verdict, group after group; refused by `key` when the reward gives none."""
    flags = [c for g in groups for c in g.correct()]
    if any(c is None for c in flags):
        raise UserError(f"{key} needs a correctness verdict, and the reward terms give no 'acc' component; "
                        "add the accuracy (or plus_minus_one, phi4_plus) reward")
    return torch.tensor(flags, dtype=torch.bool)


def _usable(groups: list[Group], band, counts: Counter) -> list[Group]:
    """Scored groups inside the pass-rate band (Phi-4-mini prompt filtering), counted."""
    scored = [g for g in groups if g.scored]
    counts["groups/skipped"] += len(groups) - len(scored)
    if band is None or not scored:
        return scored
    rates = correctness(scored, "algorithm.pass_rate_band").view(len(scored), -1).double().mean(1)  # [n]
    verdicts = [band_verdict(float(rate), band) for rate in rates]
    counts.update(f"groups/{v[0]}" for v in verdicts if v)  # too_hard, too_easy
    return [g for g, v in zip(scored, verdicts) if v is None]


def collect(run: Run, step: int, temperature: float) -> tuple[list[Group], list[Group], Counter]:
    """Roll out and score one step's prompts: (groups to train on, every group sampled, counts).

    Without dynamic sampling every usable group is kept. With it, zero-variance
    groups are dropped and up to `max_resample_rounds` more rounds draw fresh
    prompts (at most prompts_per_step a round, as DAPO does) until the batch is full;
    with no cap, until it is full or this step has drawn as many prompts as there are.
    """
    cfg, a = run.cfg, run.cfg.algorithm
    need, size = cfg.train.prompts_per_step, cfg.rollout.group_size
    sampling = SamplingConfig(n=size, temperature=temperature, top_p=cfg.rollout.top_p,
                              max_tokens=cfg.rollout.max_tokens)
    kept, every, counts = [], [], Counter()
    draw = need
    rounds = 1 if not a.dynamic_sampling else 1 + (a.max_resample_rounds if a.max_resample_rounds is not None
                                                   else len(run.train.problems) // need + 1)
    for round_ in range(rounds):
        t0 = time.perf_counter()
        sp = sampling.model_copy(update={"seed": _seed(cfg.train.seed, step, round_, "rollout")})
        groups = sample_groups(run.engine, run.train, run.sampler.draw(draw), sp)
        counts["time/rollout"] += time.perf_counter() - t0
        scoring = run.rewarding.submit(score_groups, run.scorer, groups)
        if run.ref is not None:  # overlaps the reward workers
            t0 = time.perf_counter()
            _reference(run, groups, temperature)
            counts["time/reference"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = scoring.result()
        counts["time/reward_wait"] += time.perf_counter() - t0
        counts["time/reward"] += scored["seconds"]
        counts["reward/timeouts"] += scored["timeouts"]
        every += groups
        usable = _usable(groups, a.pass_rate_band, counts)
        counts["rounds"] = round_ + 1
        if not a.dynamic_sampling:
            kept = usable
            break
        info = keep_informative(group_rewards(usable), size, need - len(kept))
        kept += [usable[i] for i in info.groups]
        if info.short == 0:
            break
        draw = min(info.to_draw or need, need)
    return kept, every, counts


def rows_for(run: Run, groups: list[Group], step: int) -> list[Row]:
    """Training rows with group-relative advantages; rebalanced copies when configured."""
    a, size = run.cfg.algorithm, run.cfg.rollout.group_size
    rewards = group_rewards(groups)  # [n*G]
    adv = group_advantages(rewards, size, a.adv_scale)  # [n*G]
    flat = [(g, k) for g in groups for k in range(size)]
    order = torch.arange(len(flat))
    if a.rebalance:  # positives are the correct samples, not those with reward > 0
        order = rebalance(rewards, correctness(groups, "algorithm.rebalance"), size,
                          _seed(run.cfg.train.seed, step, "rebalance"))
    rows = []
    for i in order.tolist():
        g, k = flat[i]
        s = g.samples[k]
        ref = g.ref_logprobs[k] if g.ref_logprobs is not None else None
        rows.append(Row(g.prompt_ids, s.token_ids, s.logprobs, float(adv[i]), ref, s.finish_reason == "length"))
    return rows


def warn(step: int, m: dict, cfg: GRPOConfig) -> None:
    """LOUD warnings for the ways a GRPO run silently learns nothing."""
    say = lambda msg: console.print(f"[bold red]WARNING step {step}: {msg}[/]")  # noqa: E731
    if m["truncation_ratio"] > TRUNCATION_WARNING:
        say(f"{m['truncation_ratio']:.0%} of responses hit rollout.max_tokens={cfg.rollout.max_tokens} and were "
            "cut off; truncated responses all get the same low reward, so the loss is ~0. "
            "Raise rollout.max_tokens.")
    if m.get("zero_variance_frac") == 1.0:
        say("every group's rewards are all equal (all right or all wrong): every advantage is 0, so the "
            "policy loss is 0 and nothing is learned. Check reward/* and accuracy.")
    if m.get("groups/skipped"):
        say(f"{m['groups/skipped']} groups skipped: their reward returned None (an unusable ground truth?)")
    if m.get("groups/kept") == 0:
        say("no group left to train on after filtering; no update this step")


def validate(run: Run) -> dict[str, float]:
    """Greedy, one sample per validation problem (verl's validation default)."""
    sp = SamplingConfig(n=1, temperature=0.0, max_tokens=run.cfg.rollout.max_tokens)
    groups = sample_groups(run.engine, run.val, list(range(len(run.val.problems))), sp)
    score_groups(run.scorer, groups)
    m = rollout_metrics(groups, 1)
    m.pop("zero_variance_frac", None)
    return {f"eval/{k}": v for k, v in m.items()}


def grpo_step(run: Run, step: int) -> tuple[dict[str, float], list[Group]]:
    """One full GRPO step (0-based `step`); returns its metrics and every group it sampled."""
    t_step = time.perf_counter()
    r = run.cfg.rollout
    temperature = (r.temperature if r.anneal_to is None
                   else temperature_at(step, r.temperature, r.anneal_to, anneal_steps=r.anneal_steps))
    kept, every, counts = collect(run, step, temperature)
    m = {"temperature": temperature, "lr": run.optimizer.param_groups[0]["lr"], **counts,
         **rollout_metrics(every, run.cfg.rollout.group_size), "groups/kept": len(kept)}
    if kept:
        t0 = time.perf_counter()
        t = run.cfg.train
        mbs = micro_batches(rows_for(run, kept, step), t.micro_batch, run.tokenizer.pad_token_id, run.device,
                            t.micro_batch_tokens)
        m.update(train_on_batch(run.lm, run.optimizer, mbs, run.cfg.algorithm, run.cfg.optim.max_grad_norm,
                                temperature, run.cfg.rollout.max_tokens, run.autocast, t.logits_chunk))
        m["time/train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # LoRA: base + adapters, under the base's names. Verified: raises if the engine did not take them.
        run.engine.load_weights(merged_state_dict(run.lm).items())
        m["time/sync"] = time.perf_counter() - t0
    run.scheduler.step()
    m["time/step"] = time.perf_counter() - t_step
    m["perf/samples_per_s"] = m["samples"] / m["time/step"]
    m["perf/rollout_tokens_per_s"] = m["samples"] * m["response_len/mean"] / max(m["time/rollout"], 1e-9)
    warn(step + 1, m, run.cfg)
    return m, every


# ---------------------------------------------------------------- the run

def _samples_log(run_dir: Path, start: int) -> JsonlAppender:
    path = run_dir / "samples.jsonl"
    if path.exists():  # drop what a killed run logged after its last checkpoint
        write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= start])
    return JsonlAppender(path)


def _progress_line(step: int, total: int, m: dict) -> str:
    get = lambda k: m.get(k, float("nan"))  # noqa: E731
    return (f"step {step}/{total} reward {get('reward/mean'):+.3f} acc {get('accuracy'):.2f} "
            f"len {m['response_len/mean']:.0f}/{m['response_len/max']:.0f} trunc {m['truncation_ratio']:.0%} "
            f"zero-var {get('zero_variance_frac'):.0%} kl {get('kl'):.2e} ent {get('entropy'):.2f} "
            f"clip {get('clip_fraction'):.2f} | rollout {m['time/rollout']:.1f}s reward {m['time/reward']:.1f}s "
            f"train {m.get('time/train', 0.0):.1f}s")


def train_grpo(cfg: GRPOConfig) -> TrainResult:
    """Run GRPO as configured; resumes from the newest checkpoint in train.out_dir."""
    t = cfg.train
    run_dir = Path(t.out_dir)
    run = build_run(cfg, run_dir)
    try:
        digest = hashlib.sha1(json.dumps([p.id for p in run.train.problems]).encode()).hexdigest()[:16]
        start, data = resume_state(run_dir, t, run.lm, run.optimizer, run.scheduler, digest)
        if start:
            run.sampler.load_state_dict(data["sampler"])
            console.print(f"resumed from step {start} in {run_dir}")
        run.engine.load_weights(merged_state_dict(run.lm).items())  # the engine starts on the trainer's weights
        dump_config(cfg, run_dir / "config.yaml")
        tracker = Tracker(run_dir, cfg.tracker, cfg.model_dump(mode="json"), resume_step=start)
        samples = _samples_log(run_dir, start)
        end = min(t.steps, t.stop_after or t.steps)
        metrics: dict[str, float] = {}
        if start == 0 and run.val is not None:
            tracker.log(0, validate(run))
        for step in range(start, end):
            metrics, every = grpo_step(run, step)
            done = step + 1
            every_n = bool(t.save_every) and done % t.save_every == 0
            if run.val is not None and (every_n or done == t.steps):  # not at stop_after: resume stays exact
                metrics.update(validate(run))
            tracker.log(done, metrics)
            if t.log_samples_every and (done % t.log_samples_every == 0 or done == 1):
                for r in every[0].rollouts():
                    samples.write({"step": done, **r.model_dump(mode="json")})
            if every_n or done == end:
                save_state(run_dir, done, run.lm, run.optimizer, run.scheduler, digest, t.keep_checkpoints,
                           sampler=run.sampler.state_dict())
            console.print(_progress_line(done, t.steps, metrics), highlight=False)
        tracker.close()
        samples.close()
        final = export_model(run.lm, run.tokenizer, run_dir / "final") if end == t.steps else None
        return TrainResult(run_dir, end, t.steps, final, metrics)
    finally:
        run.rewarding.shutdown(wait=True)
        run.scorer.close()
