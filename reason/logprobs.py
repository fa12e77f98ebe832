"""Per-token log-probabilities and entropy, from logits or straight from an LM head.

The vocabulary-sized row of logits each token gets is the largest tensor of a long
training step (SmolLM2's 49,152 floats a token: 1.6 GB for 8K tokens in float32, and
autograd keeps several such copies: the softmax, the entropy's product, the gradient).
`head_logprobs` runs the LM head over `chunk` positions at a time (`_HeadChunk`): the
forward keeps each chunk's [n] results only, the backward recomputes one chunk's logits
at a time and writes their gradient in closed form, so the gradients are exact and the
logits of a step never exist at once. SFT and DPO take their log-probs from
`TokenLogProbs`, GRPO from rl.step, both through it. Torch only: the GPU check
(benchmarks/gpu_check.py) runs it where the config layer's packages are absent.

Every log-softmax is taken in at least float32, so bf16 logits keep their precision in
the normaliser. Shapes: N positions, V vocabulary, H hidden.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

DEFAULT_CHUNK = 512  # positions per LM-head call: 100 MB of float32 logits at SmolLM2's vocab, 311 MB at Qwen2's


def _upcast(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """x in at least float32, divided by the temperature."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x if temperature == 1.0 else x / temperature


def _logp(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(x)[ids] as x[id] - logsumexp(x): [n, V], [n] -> [n]."""
    return x.gather(-1, ids[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)


def _entropy(x: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(x) - sum(softmax(x) * x), in nats: [n, V] -> [n]."""
    return torch.logsumexp(x, dim=-1) - (torch.softmax(x, dim=-1) * x).sum(-1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                   chunk_rows: int = DEFAULT_CHUNK) -> torch.Tensor:
    """log softmax(logits / temperature)[ids]: logits [B, T, V], ids [B, T] -> [B, T].

    Computed over chunks of rows, each upcast to float32. Without grad the extra
    memory is one chunk; with grad, autograd keeps each chunk's float32 copy, as
    log_softmax would. Pass the temperature the rollout was sampled at, so
    pi / pi_old compares the distributions that were actually sampled.
    """
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])  # [B*T, V]
    out = [_logp(_upcast(x, temperature), i) for x, i in zip(flat.split(chunk_rows), ids.reshape(-1).split(chunk_rows))]
    return torch.cat(out).view(ids.shape)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature) per position: [B, T, V] -> [B, T].

    Chunked and upcast like token_logprobs; it keeps the graph, so an entropy bonus
    gets its gradient.
    """
    flat = logits.reshape(-1, logits.shape[-1])  # [B*T, V]
    return torch.cat([_entropy(_upcast(x, temperature)) for x in flat.split(chunk_rows)]).view(logits.shape[:-1])


class HeadLogProbs(NamedTuple):
    logp: torch.Tensor  # [N] at the temperature, with its graph
    entropy: torch.Tensor | None  # [N] at the temperature, with its graph; when asked for
    raw: torch.Tensor | None  # [N] at temperature 1, detached (what an engine reports); when asked for


class _HeadChunk(torch.autograd.Function):
    """One chunk of the LM head and its log-softmax, keeping no [n, V] tensor between forward and backward.

    The backward recomputes the chunk's logits (under the forward's autocast state) and
    writes d(loss)/d(logits) in closed form, in place in the softmax's buffer:
    d logp_i / dx = onehot(i) - p and dH / dx = -p * (log p + H), for x = logits / T.
    Autograd through log_softmax, gather and the entropy would take ~3x the passes over
    [n, V] (a quarter of a small model's update on CPU); the matmuls are the same.
    """

    @staticmethod
    def forward(ctx, hidden, ids, head, temperature, entropy, raw, entropy_grad, *params):
        logits = head(hidden)  # [n, V]
        ls = torch.log_softmax(_upcast(logits, temperature), dim=-1)  # [n, V] float32
        logp = ls.gather(-1, ids[:, None]).squeeze(-1)  # [n]
        ent = -ls.exp().mul_(ls).sum(-1) if entropy else None  # [n]
        raw_logp = None
        if raw:
            raw_logp = logp.clone() if temperature == 1.0 else _logp(_upcast(logits, 1.0), ids)
        ctx.mark_non_differentiable(*[x for x in (raw_logp, None if entropy_grad else ent) if x is not None])
        ctx.save_for_backward(hidden, ids, ent if entropy_grad else None)
        ctx.head, ctx.temperature, ctx.params = head, temperature, params
        kind = hidden.device.type
        ctx.autocast = kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
        return logp, ent, raw_logp

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_raw):
        hidden, ids, ent = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        h = hidden.detach().requires_grad_(ctx.needs_input_grad[0])
        wrt = [h] * h.requires_grad + list(ctx.params)
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
            logits = ctx.head(h)  # [n, V], recomputed
        with torch.no_grad():
            x = _upcast(logits.detach(), ctx.temperature)
            if ent is not None:  # g_x = -p * (g_logp + g_ent * (log p + H))
                ls = torch.log_softmax(x, dim=-1)
                g = ls.add(ent[:, None]).mul_(g_ent[:, None]).add_(g_logp[:, None]).mul_(ls.exp_()).neg_()
            else:  # g_x = -p * g_logp, in the softmax's own buffer
                g = torch.softmax(x, dim=-1).mul_(-g_logp[:, None])
            g.scatter_add_(-1, ids[:, None], g_logp[:, None])  # + g_logp * onehot(id)
            if ctx.temperature != 1.0:
                g.div_(ctx.temperature)
        grads = list(torch.autograd.grad(logits, wrt, g.to(logits.dtype))) if wrt else []
        g_hidden = grads.pop(0) if h.requires_grad else None
        return (g_hidden, None, None, None, None, None, None, *grads)


def head_logprobs(head, hidden: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                  chunk: int = DEFAULT_CHUNK, entropy: bool = False, raw: bool = False,
                  entropy_grad: bool = True) -> HeadLogProbs:
    """Log-probs of `ids` (and the entropy) under head(hidden), `chunk` positions at a time.

    hidden [N, H], ids [N] -> [N] each. With grad enabled each chunk's logits are
    recomputed in the backward (under the forward's autocast state), so the peak is one
    chunk's logits and their softmax, in forward and in backward.
    chunk=0 runs the head over all N positions at once and keeps every logit for
    backward: the old path, kept to measure against. `raw` adds the detached
    temperature-1 log-probs from the same logits (the engine's side of the
    rollout/trainer mismatch) at no extra head call. `entropy_grad=False` computes
    the entropy without a graph (a metric only), which saves its term in the backward.
    """
    if hidden.shape[:-1] != ids.shape or ids.dim() != 1:
        raise ValueError(f"hidden {tuple(hidden.shape)} and ids {tuple(ids.shape)} must be [N, H] and [N]")
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    if chunk == 0:
        logits = head(hidden)  # [N, V]
        logp = token_logprobs(logits, ids, temperature)
        ent = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature) if entropy else None
        raw_logp = None
        if raw:
            raw_logp = logp.detach() if temperature == 1.0 else token_logprobs(logits.detach(), ids)
        return HeadLogProbs(logp, ent, raw_logp)
    if not len(ids):
        empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return HeadLogProbs(empty, empty if entropy else None, empty if raw else None)
    params = [p for p in head.parameters() if p.requires_grad]
    parts = [_HeadChunk.apply(h, i, head, temperature, entropy, raw, entropy_grad, *params)
             for h, i in zip(hidden.split(chunk), ids.split(chunk))]
    logp, ent, raw_logp = (None if p[0] is None else torch.cat(p) for p in zip(*parts))
    return HeadLogProbs(logp, ent, raw_logp)


class TokenLogProbs(torch.nn.Module):
    """log p(target) of every target token of a packed batch: the forward SFT and DPO share.

    Only positions that have a target go through the LM head, `chunk` of them at a
    time (`head_logprobs`, `train.logits_chunk`), so prompt and padding tokens never
    cost a vocabulary-sized row of logits and the target tokens' logits never exist
    at once. Packed sequences are kept apart by their position ids, which restart at
    0: sdpa, eager and flex attention build a block-diagonal mask from them, and
    flash-attention reads them as sequence boundaries within one row only, so for it
    (`one_row`, on by default with flash_attention_2) a micro-batch of several rows is
    laid end to end first. Targets are [B, T] token ids, IGNORE_INDEX where none.
    """

    def __init__(self, lm, one_row: bool | None = None, chunk: int = DEFAULT_CHUNK):
        super().__init__()
        self.lm = lm
        self.chunk = chunk
        impl = getattr(lm.config, "_attn_implementation", None) or ""
        self.one_row = impl.startswith("flash_attention") if one_row is None else one_row

    def forward(self, input_ids, position_ids, targets):  # [B, T] each -> [N]
        if self.one_row:  # [B, T] -> [1, B*T]; a padding tail restarts at 0 too, so it stays apart
            input_ids, position_ids, targets = (x.reshape(1, -1) for x in (input_ids, position_ids, targets))
        base = self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm
        hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # [B, T, H]
        keep = targets >= 0  # IGNORE_INDEX (reason.chat) is negative, a token id never is
        return head_logprobs(base.get_output_embeddings(), hidden[keep], targets[keep], chunk=self.chunk).logp  # [N]
