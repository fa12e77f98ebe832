"""Stages fanned out over a Ray cluster, with the same output as one process.

`reason reward score --shards N`, `reason distill generate --shards N` and `reason
distill select --shards N`, run as (or inside) a Ray job, split their input into N
contiguous shards, run the stage's own local function on every shard as one Ray task,
and merge the results in input order, so the output file equals a one-process run's.
The driver reads the inputs and writes the outputs; tasks get their shard as data, so
only the config's model (or teacher endpoint) must be reachable from every node.
This module holds the shard arithmetic, the task wrapper and the reward fan-out; the
distillation fan-outs are in distill.fanout.
"""
from __future__ import annotations

from reason.errors import UserError


def spans(n: int, shards: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, end) of at most `shards` contiguous shards of n items; all but the last hold a multiple of `align`.

    >>> spans(7, 3), spans(10, 3, align=4), spans(0, 3)
    ([(0, 3), (3, 6), (6, 7)], [(0, 4), (4, 8), (8, 10)], [])
    """
    size = -(-max(1, n) // max(1, shards))  # ceil, and at least 1
    size = -(-size // align) * align
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def ray_task(fn, engine: str | None = None):
    """`fn` as a Ray task of the job's cluster: one GPU where `engine` runs vLLM and the cluster
    has GPUs (one engine per GPU), else one CPU. Connects to the cluster on first use."""
    try:
        import ray
    except ImportError:
        raise UserError("--shards needs Ray: pip install 'ray[default]==2.60.0' (this project's [ray] extra)") from None
    if not ray.is_initialized():
        ray.init(address="auto")
    gpu = engine in ("vllm", "auto") and ray.cluster_resources().get("GPU", 0) >= 1
    return ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(fn)


def gather(refs: list) -> list:
    import ray

    return ray.get(refs)


def _score_shard(samples: list[dict], reward: dict) -> list[dict]:
    """One Ray task: score one shard exactly as `reason reward score` does."""
    from rewards.registry import RewardConfig
    from rewards.score import score_samples

    rc = RewardConfig.model_validate(reward)
    return score_samples(samples, rc.terms, rc.workers, rc.timeout)[0]


def score_fanout(samples: list, reward, shards: int) -> list[dict]:
    """Score samples as `shards` Ray tasks; rows in input order, `index` = position in `samples`."""
    clean = [s.model_dump(exclude_none=True) for s in samples]
    parts = spans(len(clean), shards)
    task = ray_task(_score_shard)
    shard_rows = gather([task.remote(clean[a:b], reward.model_dump()) for a, b in parts])
    return [{**r, "index": a + r["index"]} for (a, _), rows in zip(parts, shard_rows) for r in rows]
