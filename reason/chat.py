"""The one chat format: system prompt, think tags, template rendering, loss mask.

SFT, DPO, GRPO, eval and trace generation all go through this module, so a model is
trained on exactly the text it is later sampled with.
Paper knobs (arXiv 2504.21318; docs/recipes.md §1): Phi-4-reasoning's fixed system message, its
`<think> ... </think>` response shape, its think tokens (repurposed placeholder
tokens, no embedding resize; or new special tokens with a resize), and its
`<|im_sep|>` chat template. Two failure modes from peers are closed here: a template
that pre-fills `<think>` (format reward always 0) and pad == eos (EOS masked out of
the loss, so the model never learns to stop).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Literal

from pydantic import model_validator
from tokenizers import AddedToken, Tokenizer

from reason.config import Section

if TYPE_CHECKING:  # transformers is slow to import; configs load without it
    from transformers import PreTrainedTokenizerBase

PHI4_SYSTEM_PROMPT = (
    "You are Phi, a language model trained by Microsoft to help users. Your role as "
    "an assistant involves thoroughly exploring questions through a systematic "
    "thinking process before providing the final precise and accurate solutions. This "
    "requires engaging in a comprehensive cycle of analysis, summarizing, "
    "exploration, reassessment, reflection, backtracing, and iteration to develop "
    "well-considered thinking process. Please structure your response into two main "
    "sections: Thought and Solution using the specified format: <think> {Thought "
    "section} </think> {Solution section}. In the Thought section, detail your "
    "reasoning process in steps. Each step should include detailed considerations "
    "such as analysing questions, summarizing relevant findings, brainstorming new "
    "ideas, verifying the accuracy of the current steps, refining any errors, and "
    "revisiting previous steps. In the Solution section, based on various attempts, "
    "explorations, and reflections from the Thought section, systematically present "
    "the final solution that you deem correct. The Solution section should be "
    "logical, accurate, and concise and detail necessary steps needed to reach the "
    "conclusion. Now, try to solve the following question through the above "
    "guidelines:"
)

# ChatML as SmolLM2 and Qwen ship it, without a default system message.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Phi-4's released format: <|im_sep|> after the role, nothing between turns.
PHI4_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "phi4": PHI4_TEMPLATE}
IGNORE_INDEX = -100  # label value that carries no loss
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>")  # reused before a new pad is added


class ChatConfig(Section):
    """How prompts and responses are laid out; one block shared by every stage.

    think_tokens: "text" leaves the tags as ordinary text; "special" adds them as new
    tokens and resizes the embeddings; "existing" uses tokens already in the vocab,
    either under their own names or by renaming the placeholders in think_token_ids
    (Phi-4 repurposed two of its dummy tokens; no resize).
    """

    system_prompt: str | None = PHI4_SYSTEM_PROMPT  # None: no system message
    think_open: str = "<think>"
    think_close: str = "</think>"
    think_tokens: Literal["text", "special", "existing"] = "text"
    think_token_ids: tuple[str, str] | None = None  # vocab strings, e.g. ("<|dummy_85|>", "<|dummy_86|>")
    template: Literal["tokenizer", "chatml", "phi4"] = "tokenizer"

    @model_validator(mode="after")
    def _ids_only_when_existing(self) -> "ChatConfig":
        if self.think_token_ids is not None and self.think_tokens != "existing":
            raise ValueError("think_token_ids is only used with think_tokens: existing")
        return self


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase, cfg: ChatConfig, model=None
) -> PreTrainedTokenizerBase:
    """Apply the think-token choice, pad != eos and the template, in place.

    Pass the model whenever one will see these ids: added tokens resize its
    embeddings, and its pad id follows the tokenizer's. Safe to call twice.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so a model could never learn to stop")
    tags = (cfg.think_open, cfg.think_close)
    if cfg.think_tokens == "special":
        # special=False: vLLM and verl decode with skip_special_tokens, which would erase the tags.
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    elif cfg.think_tokens == "existing":
        _repurpose(tokenizer, dict(zip(cfg.think_token_ids or tags, tags)))
    _ensure_pad(tokenizer)
    if cfg.template != "tokenizer":
        tokenizer.chat_template = TEMPLATES[cfg.template]  # saved checkpoints carry their format
    if model is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    # With pad == eos, collators that mask padding also mask the EOS label.
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    for name in (*PAD_CANDIDATES, tokenizer.unk_token):
        if name in vocab and vocab[name] != tokenizer.eos_token_id:
            tokenizer.pad_token = name
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})


def _repurpose(tokenizer: PreTrainedTokenizerBase, renames: dict[str, str]) -> None:
    """Rename vocab tokens (source -> tag) as unsplittable, non-special tokens."""
    vocab = tokenizer.get_vocab()
    # Renaming a named special token would leave the tokenizer config pointing at a lost string.
    reserved = set(tokenizer.all_special_tokens)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    added = {t["content"]: t for t in state["added_tokens"]}
    changed = False
    for src, dst in renames.items():
        if src not in vocab and dst in vocab:
            src = dst  # renamed by an earlier call
        if src not in vocab:
            raise ValueError(f"think token {src!r} is not in the tokenizer's vocabulary")
        if src in reserved:
            raise ValueError(f"{src!r} is one of the tokenizer's named special tokens; pick an unused placeholder")
        if src != dst and dst in vocab:
            raise ValueError(f"{dst!r} is already token {vocab[dst]}; it cannot also be {src!r}")
        entry = added.get(src)
        if entry is None:
            entry = {"id": vocab[src], "single_word": False, "lstrip": False, "rstrip": False}
            state["added_tokens"].append(entry)
        elif entry["content"] == dst and not entry["special"]:
            continue
        entry.update(content=dst, normalized=False, special=False)
        _rename_in_model(state["model"], src, dst)
        changed = True
    if changed:
        tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))  # no public rename API


def _rename_in_model(model: dict, src: str, dst: str) -> None:
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and src in vocab:  # BPE, WordPiece, WordLevel
        vocab[dst] = vocab.pop(src)
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        for piece in vocab:
            if piece[0] == src:
                piece[0] = dst


def build_messages(prompt: str | list[dict], cfg: ChatConfig, response: str | None = None) -> list[dict]:
    """System prompt (unless the prompt has its own) + user turn(s) (+ assistant)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("a prompt must end with a user message")
    if cfg.system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def format_response(reasoning: str, answer: str, cfg: ChatConfig) -> str:
    """The one canonical response text: `<think>\\n{reasoning}\\n</think>\\n\\n{answer}`."""
    return f"{cfg.think_open}\n{reasoning.strip()}\n{cfg.think_close}\n\n{answer.strip()}"


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], cfg: ChatConfig, generation: bool) -> str:
    template = TEMPLATES.get(cfg.template)  # None: the tokenizer's own
    if template is None and not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template; set chat.template to 'chatml' or 'phi4'")
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], cfg: ChatConfig) -> str:
    """The text to sample from, ending with the assistant header and never with think_open.

    A template that pre-fills think_open hides the tag from the completion, so a
    format reward would always fail: the pre-fill is cut off. Encode the result
    with add_special_tokens=False; the template already wrote any BOS.
    """
    text = _render(tokenizer, build_messages(prompt, cfg), cfg, generation=True)
    head, tag, tail = text.rpartition(cfg.think_open)
    return head if tag and not tail.strip() else text


def tokenize_example(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict], response: str,
                     cfg: ChatConfig) -> dict:
    """Ids and labels for one training example: loss on the response and its EOS only.

    Returns {"input_ids", "labels"}. Labels are IGNORE_INDEX on the system and user
    turns, the template's headers and whatever follows the EOS that closes the
    assistant turn. Nothing is truncated: the trainers drop over-long examples.
    """
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, prompt, cfg), add_special_tokens=False)
    full = _render(tokenizer, build_messages(prompt, cfg, response), cfg, generation=False)
    ids = tokenizer.encode(full, add_special_tokens=False)
    n = len(prompt_ids)
    if ids[:n] != prompt_ids:
        raise ValueError(
            "the rendered prompt is not a token prefix of the rendered conversation, so the "
            "loss mask cannot be placed; try chat.template: chatml or phi4"
        )
    completion = ids[n:]
    if tokenizer.eos_token_id not in completion:
        raise ValueError(
            f"the chat template does not close the assistant turn with the EOS token "
            f"{tokenizer.eos_token!r}, so the model would never learn to stop"
        )
    end = len(ids) - completion[::-1].index(tokenizer.eos_token_id)  # one past the last EOS
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * n + ids[n:end] + [IGNORE_INDEX] * (len(ids) - end)}
