"""One way to open a model: `load(path)` -> (model, tokenizer), for every command and stage.

The one idea: what a directory holds is told by its files, so callers never choose a reader.

- config.json + weights: a model (ours, one saved by transformers, or `lmforge import`'s);
- the same with `quantization_config` in config.json: a quantized model (QuantLinear layers,
  `model/quant.py`), for inference only;
- adapter_config.json: a LoRA adapter (PEFT layout) naming its base model, which is loaded with
  the adapter merged in (plain linear layers decode fastest and train like any model);
- config.json with model_type "mamba": a state-space model (`model/mamba.py`, its own class);
- config.json with model_type "t5": an encoder-decoder (`model/t5.py`, its own class).

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
from lmforge.model.mamba import is_mamba_config, load_mamba
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


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path / 'config.json'} is not valid JSON: {e}") from None


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
    hf = _read_config(path) if base == path else {}  # an adapter's base is a GPT
    if is_mamba_config(hf):  # a Mamba (no adapter, no quant)
        if float_only:  # the stages that train or rewrite weights work on a GPT
            raise ConfigError(
                f"{path} is a Mamba: this stage works on GPT-family models; a Mamba trains with "
                "`lmforge pretrain` (model.arch mamba) and decodes with generate and chat"
            )
        return load_mamba(path, device=device), Tokenizer.load(path)
    if hf.get("model_type") == "t5":  # an encoder-decoder (no adapter, no quant)
        if float_only:  # as for a Mamba: the stages that train or rewrite weights take a GPT
            raise ConfigError(
                f"{path} is a T5 (encoder-decoder): this stage works on GPT-family models; "
                "a T5 is used from Python (lmforge.model.t5, docs/t5.md)"
            )
        model = load_t5(path, device=device).requires_grad_(trainable)
        return model, Tokenizer.load(path)
    model = load_model(base, device=device, quantized_ok=not float_only)
    if base != path:
        model = merge_lora(load_adapter(model, path))
    model.eval().requires_grad_(trainable)
    return model, Tokenizer.load(base)
