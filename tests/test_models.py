"""Tiny test models round-trip; the embedded SmolLM2 converts once into a plain cache."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reason import models
from reason.chat import ChatConfig, build_messages, prepare_tokenizer, render_prompt
from tiny import save_tiny, tiny_model, tiny_tokenizer


def test_tiny_tokenizer_is_deterministic_and_small():
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab() and 256 < len(a) <= 1024
    assert (a.eos_token, a.pad_token) == ("<|im_end|>", "<|endoftext|>") and a.pad_token_id != a.eos_token_id
    text = "<|im_start|>user\nWhat is 12 * 7?<|im_end|>"
    assert a.decode(a.encode(text)) == text


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_save_tiny_round_trip(tmp_path, arch):
    save_tiny(tmp_path, arch, seed=3)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["hidden_size"] // config["num_attention_heads"] == 64  # vLLM CPU needs >= 64
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.get_vocab() == tiny_tokenizer().get_vocab() and tok.chat_template
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    with torch.no_grad():
        expected = tiny_model(arch, seed=3)(ids).logits
        assert torch.equal(loaded(ids).logits, expected)
        assert not torch.equal(tiny_model(arch, seed=4)(ids).logits, expected)


def test_gguf_is_shipped_in_the_package():
    path = models.gguf_file()
    assert path.suffix == ".gguf" and path.stat().st_size > 10_000_000


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("REASON_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"


def test_killed_conversion_leaves_no_cache(monkeypatch, tmp_path):
    def dies_halfway(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_model_converts_once(monkeypatch, tmp_path):
    monkeypatch.setenv("REASON_CACHE", str(tmp_path))
    calls = []
    convert = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda *a: calls.append(a) or convert(*a))

    path = models.default_model_dir()
    assert path == tmp_path / models.DEFAULT_NAME and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == [models.DEFAULT_NAME]  # no temp dir left
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    tok = models.load_tokenizer("default")
    messages = build_messages("What is 2+3?", ChatConfig())
    raw = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert raw.endswith("<|im_start|>assistant\n")  # its template does not pre-fill <think>
    cfg = ChatConfig(system_prompt=None)
    vocab = len(tok)
    prepare_tokenizer(tok, cfg)
    assert tok.pad_token_id != tok.eos_token_id and len(tok) == vocab  # an existing token became pad

    model = models.load_pretrained(path, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = tok(render_prompt(tok, "What is 2+3?", cfg), return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert 1 <= out.shape[1] - ids.input_ids.shape[1] <= 4

    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert models.default_model_dir() == path and len(calls) == 1
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
