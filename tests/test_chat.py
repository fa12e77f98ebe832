"""The chat format: which tokens carry loss, think-token modes, templates, pad != eos."""
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from reason.chat import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    PHI4_SYSTEM_PROMPT,
    ChatConfig,
    build_messages,
    format_response,
    prepare_tokenizer,
    render_prompt,
    tokenize_example,
)
from tiny import tiny_model, tiny_tokenizer

DUMMIES = ("<|dummy_0|>", "<|dummy_1|>")
QUESTION = "What is 2+3?"


def chat_cfg(mode="text", **kw):
    ids = DUMMIES if mode == "existing" else None
    return ChatConfig(system_prompt="You are terse.", think_tokens=mode, think_token_ids=ids, **kw)


@pytest.mark.parametrize("mode", ["text", "special", "existing"])
def test_loss_mask_token_by_token(mode):
    tok = tiny_tokenizer()
    model = tiny_model(tokenizer=tok)
    dummy_ids = tok.convert_tokens_to_ids(list(DUMMIES))
    cfg = chat_cfg(mode, template="chatml")
    prepare_tokenizer(tok, cfg, model)
    response = format_response("2 plus 3 is 5", "\\boxed{5}", cfg)
    ex = tokenize_example(tok, QUESTION, response, cfg)

    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    prompt = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    eos = tok.eos_token_id
    assert ex["input_ids"] == enc(prompt) + enc(response) + [eos] + enc("\n")
    masked, trained = [IGNORE_INDEX] * len(enc(prompt)), enc(response) + [eos]
    assert ex["labels"] == masked + trained + [IGNORE_INDEX]
    for i, label in enumerate(ex["labels"]):  # a trained position predicts its own input token
        assert label in (IGNORE_INDEX, ex["input_ids"][i])
    assert tok.decode(trained) == response + "<|im_end|>"

    first = ex["labels"][len(masked)]
    embeddings = (model.get_input_embeddings().num_embeddings, model.get_output_embeddings().out_features)
    if mode == "text":
        assert len(enc("<think>")) > 1 and len(tok) == 512
    elif mode == "special":
        assert len(tok) == 514 and embeddings == (514, 514)
        assert enc("<think>") == [first] and len(enc("</think>")) == 1
    else:  # Phi-4's way: the placeholders become the tags, the vocab does not grow
        assert len(tok) == 512 and embeddings == (512, 512)
        assert [enc("<think>"), enc("</think>")] == [[dummy_ids[0]], [dummy_ids[1]]]
        assert first == dummy_ids[0]
    if mode != "text":  # engines decode with skip_special_tokens; the tags must survive it
        assert tok.decode(trained, skip_special_tokens=True) == response
    size = len(tok)
    prepare_tokenizer(tok, cfg, model)  # idempotent
    assert len(tok) == size and tokenize_example(tok, QUESTION, response, cfg) == ex


@pytest.mark.parametrize("mode", ["special", "existing"])
def test_prepared_tokenizer_survives_save(tmp_path, mode):
    tok = tiny_tokenizer()
    cfg = chat_cfg(mode, template="phi4")
    prepare_tokenizer(tok, cfg)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = format_response("r", "5", cfg)
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.convert_tokens_to_ids("<think>") == tok.convert_tokens_to_ids("<think>")
    assert render_prompt(loaded, QUESTION, chat_cfg(mode)) == render_prompt(tok, QUESTION, cfg)


def test_phi4_template_exact_strings():
    tok = tiny_tokenizer()
    cfg = ChatConfig(system_prompt="SYS", template="phi4")
    head = "<|im_start|>system<|im_sep|>SYS<|im_end|><|im_start|>user<|im_sep|>What is 2+3?<|im_end|>"
    assert render_prompt(tok, QUESTION, cfg) == head + "<|im_start|>assistant<|im_sep|>"
    ex = tokenize_example(tok, QUESTION, format_response(" add them ", "5\n", cfg), cfg)
    full = head + "<|im_start|>assistant<|im_sep|><think>\nadd them\n</think>\n\n5<|im_end|>"
    assert tok.decode(ex["input_ids"]) == full
    trained = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tok.decode(trained) == "<think>\nadd them\n</think>\n\n5<|im_end|>"
    assert ex["labels"][-1] == tok.eos_token_id  # nothing follows the EOS in this format


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "phi4"])
def test_render_prompt_ends_with_assistant_header(template):
    tok = tiny_tokenizer()
    cfg = ChatConfig(template=template)  # the Phi-4 system prompt mentions <think> itself
    text = render_prompt(tok, QUESTION, cfg)
    header = "<|im_start|>assistant<|im_sep|>" if template == "phi4" else "<|im_start|>assistant\n"
    assert text.endswith(header)
    assert text.startswith("<|im_start|>system") and PHI4_SYSTEM_PROMPT in text
    assert "<think>" not in text.rpartition("<|im_start|>assistant")[2]


def test_template_that_prefills_think_is_cut():
    tok = tiny_tokenizer()
    prefill = "assistant\\n<think>\\n' }}{% endif %}"
    tok.chat_template = CHATML_TEMPLATE.replace("assistant\\n' }}{% endif %}", prefill)
    cfg = ChatConfig(system_prompt=None)
    messages = build_messages(QUESTION, cfg)
    raw = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert raw.endswith("<think>\n")  # the template really pre-fills
    expected = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, QUESTION, cfg) == expected
    response = format_response("r", "5", cfg)
    ex = tokenize_example(tok, QUESTION, response, cfg)
    assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == response + "<|im_end|>"


def test_template_errors_are_explicit():
    tok, cfg = tiny_tokenizer(), chat_cfg()
    # The assistant turn renders under another header than the generation prompt.
    renamed = "('bot' if m['role'] == 'assistant' else m['role'])"
    tok.chat_template = CHATML_TEMPLATE.replace("m['role']", renamed)
    with pytest.raises(ValueError, match="token prefix"):
        tokenize_example(tok, QUESTION, "<think>\nr\n</think>\n\n5", cfg)
    tok.chat_template = CHATML_TEMPLATE.replace("<|im_end|>\\n' }}{% endfor", "<|im_sep|>\\n' }}{% endfor")
    with pytest.raises(ValueError, match="never learn to stop"):
        tokenize_example(tok, QUESTION, "<think>\nr\n</think>\n\n5", cfg)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(tok, QUESTION, cfg)


def test_pad_made_distinct_from_eos():
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    prepare_tokenizer(tok, ChatConfig())
    assert tok.pad_token == "<|endoftext|>" and len(tok) == 512  # reused, no new token

    bare = Tokenizer(models.WordLevel({"<|im_end|>": 0, "a": 1}, unk_token="a"))
    tok = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|im_end|>", unk_token="a")
    tok.pad_token = tok.eos_token
    model = tiny_model(tokenizer=tok)
    prepare_tokenizer(tok, ChatConfig(), model)
    assert tok.pad_token == "a"  # unk is a safe pad: padding is masked, never learned
    tok = PreTrainedTokenizerFast(tokenizer_object=bare, eos_token="<|im_end|>")
    model = tiny_model(tokenizer=tok)
    prepare_tokenizer(tok, ChatConfig(), model)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 2
    assert model.get_input_embeddings().num_embeddings == 3 and model.config.pad_token_id == 2


def test_existing_mode_checks_the_vocab():
    existing = lambda *ids: ChatConfig(think_tokens="existing", think_token_ids=ids)  # noqa: E731
    with pytest.raises(ValidationError, match="only used with think_tokens: existing"):
        ChatConfig(think_token_ids=DUMMIES)
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        prepare_tokenizer(tiny_tokenizer(), existing("<|nope|>", DUMMIES[1]))
    with pytest.raises(ValueError, match="named special tokens"):
        prepare_tokenizer(tiny_tokenizer(), existing("<|im_end|>", DUMMIES[1]))
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        prepare_tokenizer(tiny_tokenizer(), ChatConfig(think_tokens="existing"))  # no <think> token to use


def test_build_messages():
    cfg = ChatConfig()
    assert build_messages("q", cfg) == [
        {"role": "system", "content": PHI4_SYSTEM_PROMPT},
        {"role": "user", "content": "q"},
    ]
    own = [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]
    assert build_messages(own, cfg, response="a") == own + [{"role": "assistant", "content": "a"}]
    assert build_messages("q", ChatConfig(system_prompt=None)) == [{"role": "user", "content": "q"}]
    with pytest.raises(ValueError, match="end with a user message"):
        build_messages([{"role": "assistant", "content": "a"}], cfg)


def test_format_response_is_canonical():
    cfg = ChatConfig(think_open="<t>", think_close="</t>")
    assert format_response("\n step \n", " 42 ", cfg) == "<t>\nstep\n</t>\n\n42"


def test_system_prompt_is_the_papers():
    assert PHI4_SYSTEM_PROMPT.startswith("You are Phi, a language model trained by Microsoft to help users.")
    assert "<think> {Thought section} </think> {Solution section}." in PHI4_SYSTEM_PROMPT
    assert PHI4_SYSTEM_PROMPT.endswith("Now, try to solve the following question through the above guidelines:")
    assert len(PHI4_SYSTEM_PROMPT) == 1232 and "  " not in PHI4_SYSTEM_PROMPT
