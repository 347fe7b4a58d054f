"""One way to open a model: `load(path)` -> (model, tokenizer), for every command and stage.

The one idea: what a directory holds is told by its files, so callers never choose a reader.

- config.json + weights: a model (ours, one saved by transformers, or `lmforge import`'s);
- the same with `quantization_config` in config.json: a quantized model (QuantLinear layers,
  `model/quant.py`), for inference only;
- adapter_config.json: a LoRA adapter (PEFT layout) naming its base model, which is loaded with
  the adapter merged in (plain linear layers decode fastest and train like any model).

The tokenizer is the model's own, or the base model's for an adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.config import ConfigError
from lmforge.model.checkpoint import load_model
from lmforge.model.lora import CONFIG_FILE as ADAPTER_CONFIG
from lmforge.model.lora import load_adapter, merge_lora
from lmforge.model.t5 import load_t5
from lmforge.model.transformer import GPT
from lmforge.tokenizer import Tokenizer


def is_adapter(path: str | Path) -> bool:
    """Whether path is a LoRA adapter directory (it has adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def model_source(path: str | Path) -> Path:
    """The directory holding the weights and tokenizer files behind path: the base model named
    by a LoRA adapter's adapter_config.json, else path itself (checked to be a model dir)."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory not found: {path}")
    if is_adapter(path):
        return _adapter_base(path / ADAPTER_CONFIG)
    if not (path / "config.json").is_file():
        hint = ""
        if (path / "dcp").is_dir():  # a sharded training checkpoint: weights but no config.json
            hint = "; it is a sharded training checkpoint: `lmforge export` it first"
        raise ConfigError(
            f"{path} is not a model directory: it has neither config.json (a model) nor "
            f"{ADAPTER_CONFIG} (a LoRA adapter){hint}"
        )
    return path


def _model_type(path: Path) -> str | None:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
        return None  # load_model reports a bad config.json by name


def _adapter_base(config: Path) -> Path:
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ConfigError(f"{config} is not a valid adapter config: {e}") from None
    if not base or not Path(base).is_dir():
        raise ConfigError(
            f"{config}: base_model_name_or_path {base!r} is not a model directory here; "
            "merge the adapter with `lmforge export --merge-lora`"
        )
    return Path(base)


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    trainable: bool = False,
    float_only: bool | None = None,
) -> tuple[GPT, Tokenizer]:
    """(model, tokenizer) from a model, quantized model or LoRA adapter directory.

    trainable=False: for inference, gradients off. trainable=True: for a stage that trains
    the weights, so every parameter requires grad (an adapter froze its base: merged, it is
    all trainable again). A quantized checkpoint is refused when float_only (default: when
    trainable), e.g. by a stage that rewrites the weights. Either way the model is in eval
    mode; a training stage switches it to train mode itself."""
    path = Path(path)
    base = model_source(path)
    float_only = trainable if float_only is None else float_only
    if _model_type(base) == "t5":  # an encoder-decoder (model/t5.py), not a GPT
        model = load_t5(base, device=device).requires_grad_(trainable)
        return model, Tokenizer.load(base)
    model = load_model(base, device=device, quantized_ok=not float_only)
    if base != path:
        model = merge_lora(load_adapter(model, path))
    model.eval().requires_grad_(trainable)
    return model, Tokenizer.load(base)
