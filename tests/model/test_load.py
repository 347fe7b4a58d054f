"""`model.load.load`: a model, a quantized model and a LoRA adapter directory open the same way
(logits equal to what each directory holds), trainable or not; a directory that is none of these
gets an error naming what is missing; and the loader sits below every stage (imports none)."""

import json
import subprocess
import sys

import pytest
import torch

from lmforge.compress.quantize import quantize_model
from lmforge.config import ConfigError, LoRAConfig, QuantizeConfig
from lmforge.model.checkpoint import load_model, save_quantized
from lmforge.model.load import is_adapter, load
from lmforge.model.lora import LoRALinear, apply_lora, merge_lora, save_adapter
from lmforge.model.quant import QuantLinear
from lmforge.tokenizer import Tokenizer


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _ids(model):
    return torch.randint(
        0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )


def test_plain_dir_loads_frozen_for_inference_and_whole_for_training(micro_pretrained):
    model_dir = micro_pretrained[1]
    model, tok = load(model_dir)
    ids = _ids(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(_logits(model, ids), _logits(load_model(model_dir), ids))
    assert tok.encode("hello world") == Tokenizer.load(model_dir).encode("hello world")
    trainable, _ = load(model_dir, trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())


def test_adapter_dir_loads_its_base_with_the_adapter_merged(micro_pretrained, tmp_path):
    model_dir = micro_pretrained[1]
    adapted = apply_lora(load_model(model_dir), LoRAConfig(r=4, targets=["q", "v"]), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # made-up nonzero B: with B = 0 the adapter would change nothing
        for m in adapted.modules():
            if isinstance(m, LoRALinear):
                for b in m.lora_B.values():
                    b.normal_(0, 0.5, generator=gen)
    save_adapter(adapted, tmp_path / "adapter", base_model_path=str(model_dir))
    assert is_adapter(tmp_path / "adapter") and not is_adapter(model_dir)
    ids = _ids(adapted)
    want = _logits(merge_lora(adapted), ids)
    model, tok = load(tmp_path / "adapter")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    assert (_logits(load_model(model_dir), ids) - want).abs().max() > 1e-3  # the adapter counts
    assert tok.vocab_size == Tokenizer.load(model_dir).vocab_size  # the base model's tokenizer
    trainable, _ = load(tmp_path / "adapter", trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())  # base unfrozen after merging


def test_quantized_dir_loads_for_inference_and_is_refused_for_training(micro_pretrained, tmp_path):
    model_dir = micro_pretrained[1]
    model = load_model(model_dir)
    spec = quantize_model(model, QuantizeConfig(method="int8", eval_tokens=0))
    save_quantized(model, spec, tmp_path / "q", model_dir)
    loaded, _ = load(tmp_path / "q")
    assert isinstance(loaded.lm_head, QuantLinear)
    ids = _ids(model)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    with pytest.raises(ConfigError, match="quantized \\(int8\\) checkpoint: it is for inference"):
        load(tmp_path / "q", trainable=True)


def test_a_dir_that_is_no_model_gets_an_error_naming_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint directory not found: .*nope"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither config.json .* nor adapter_config.json"):
        load(tmp_path / "empty")
    (tmp_path / "sharded" / "dcp").mkdir(parents=True)
    with pytest.raises(ConfigError, match="sharded training checkpoint: `lmforge export` it"):
        load(tmp_path / "sharded")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/gone"}))
    with pytest.raises(ConfigError, match="base_model_name_or_path '/gone' is not a model dir"):
        load(adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config.json is not a valid adapter config"):
        load(adapter)


def test_the_loader_imports_nothing_above_the_model_layer():
    """model/ is below train, align, compress, infer and serve: importing the loader must not
    pull any of them in (it used to reach up into align/ and compress/)."""
    code = (
        "import json, sys, lmforge.model.load; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('lmforge.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    above = ("align", "compress", "eval", "infer", "serve", "train", "pipeline", "cli")
    loaded = json.loads(out.stdout)
    assert not [m for m in loaded if m.split(".")[1] in above], loaded
