"""Tiny tokenizer and random causal LMs, built in code, offline, for every test.

The tokenizer is a byte-level BPE trained in-process on a few lines of math text,
with ChatML markers like SmolLM2's. The models are 2-layer LLaMA / Qwen2 / Phi-3
configs with head_dim 64 (vLLM's CPU attention rejects smaller heads), saved as
plain float32 safetensors so both transformers and vLLM can load them.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from reason.chat import CHATML_TEMPLATE, PHI4_SYSTEM_PROMPT

# <|dummy_0|>/<|dummy_1|> are unused placeholders, like Phi-4's, for think_tokens="existing".
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>", "<|dummy_0|>", "<|dummy_1|>"]
VOCAB_SIZE = 512

CORPUS = [
    "What is 2 + 3? The answer is \\boxed{5}.",
    "Compute 12 * 7 = 84, so the answer is \\boxed{84}.",
    "Let x = 3. Then x^2 + 2x + 1 = 16. Therefore \\boxed{16}.",
    "Solve for y: 2y - 4 = 10, so y = 7 and the answer is \\boxed{7}.",
    "The sum of the first 10 positive integers is 55.",
    "If a triangle has sides 3, 4 and 5, its area is 6.",
    "\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}",
    "<think>\nFirst, add the numbers. Then check the result.\n</think>\n\nThe answer is 42.",
    "system user assistant Please reason step by step, and put your final answer within \\boxed{}.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -1 + - * / = ( ) [ ] { } ^ < > . , ? !",
    PHI4_SYSTEM_PROMPT,
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer: eos=<|im_end|>, pad=<|endoftext|> (distinct)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",  # as SmolLM2 has it; nothing adds it automatically
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}


def tiny_model(arch: str = "llama", tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0):
    """A random 2-layer causal LM whose vocab matches `tokenizer` (default: tiny_tokenizer())."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = _CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_attention_heads=2,  # head_dim = 128 / 2 = 64
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=256,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny(directory: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model (safetensors, float32) and its tokenizer to `directory`."""
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    tiny_model(arch, tokenizer, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def special_think_tokenizer() -> PreTrainedTokenizerFast:
    """tiny_tokenizer() with <think> and </think> as SPECIAL tokens (what skip_special_tokens erases)."""
    from tokenizers import AddedToken

    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<think>", "</think>")],
                   special_tokens=True)
    return tok


def save_taught(directory: str | Path, prompts: list[str], responses: list[str], steps: int = 40,
                tokenizer: PreTrainedTokenizerFast | None = None, paired: bool = False, seed: int = 0,
                loss_below: float | None = None) -> Path:
    """A tiny model trained (full batch, Adam) to answer every prompt with one of `responses`, about evenly
    (`paired`: prompt i with response i only). With `loss_below`, training stops once the loss is under it
    (at most `steps` steps, and it must get there): how many steps a fit takes varies by CPU.

    For tests that need answers a verifier can read, varying from sample to sample.
    Chat rendering as `reason.chat` does it with no system prompt.
    """
    from reason.chat import IGNORE_INDEX, ChatConfig, tokenize_example

    tokenizer = tokenizer or tiny_tokenizer()
    directory = Path(directory)
    tiny_model("llama", tokenizer, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    pairs = zip(prompts, responses) if paired else ((p, r) for p in prompts for r in responses)
    examples = [tokenize_example(tokenizer, p, r, ChatConfig(system_prompt=None)) for p, r in pairs]
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.tensor([e["input_ids"] + [tokenizer.pad_token_id] * (width - len(e["input_ids"])) for e in examples])
    labels = torch.tensor([e["labels"] + [IGNORE_INDEX] * (width - len(e["labels"])) for e in examples])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny steps: extra threads only contend
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels).loss
            if loss_below is not None and loss.item() < loss_below:
                break
            loss.backward()
            opt.step()
            opt.zero_grad()
        else:
            assert loss_below is None, f"the taught loss is still {loss.item():.3f} after {steps} steps"
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory)
    return directory


def write_traces(path: str | Path, n: int, levels=(1,), seed: int = 0, **teacher) -> str:
    """n synthetic problems and the programmatic teacher's trace of each, as Trace JSONL (SFT data)."""
    from distill.synthetic import synthetic_trace
    from reason.records import write_jsonl
    from reason.synthetic import generate_problems

    write_jsonl(path, [synthetic_trace(p, 0, seed, **teacher) for p in generate_problems(n, seed, tuple(levels))])
    return str(path)


def write_pairs(path: str | Path, n: int, levels=(1, 2), seed: int = 0) -> str:
    """n DPO pairs: the correct synthetic trace chosen, one whose last step is wrong rejected."""
    from distill.pairs import PreferencePair
    from distill.synthetic import synthetic_trace
    from reason.chat import ChatConfig, format_response
    from reason.records import write_jsonl
    from reason.synthetic import generate_problems

    chat = ChatConfig()

    def text(t):
        return format_response(t.reasoning, t.answer, chat)

    write_jsonl(path, [PreferencePair(problem=p, chosen=text(synthetic_trace(p, 0, seed)),
                                      rejected=text(synthetic_trace(p, 1, seed, mistake_rate=1.0)))
                       for p in generate_problems(n, seed, tuple(levels))])
    return str(path)
