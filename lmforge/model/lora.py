"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for `GPT`, saved in PEFT's format.

The one idea: our model fuses q/k/v into `attn.wqkv` and gate/up into `mlp.w13`, while HF and
PEFT give each projection its own adapter. So a `LoRALinear` wraps one fused layer and keeps one
adapter per output slice (`q`, `k`, `v` of wqkv; `gate`, `up` of w13; the whole of `o`, `down`):
slice s of the output gains `alpha / r * B_s @ A_s @ dropout(x)`. One adapter per slice is
exactly one PEFT adapter per HF module, so saving is renaming, and merging adds each `B_s @ A_s`
to its rows of the fused weight. GPT-2 fuses q/k/v in HF too (Conv1D `c_attn`), so PEFT gives it
one adapter and so do we: a single slice `qkv` spanning all of wqkv (targets q, k, v together).

    model = apply_lora(load_model("runs/x/model"), LoRAConfig(r=8), seed=0)  # base frozen
    ...train...
    save_adapter(model, "runs/x/adapter")     # PeftModel.from_pretrained opens it
    save_model(merge_lora(model), "runs/x/merged")
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import LORA_TARGETS, ConfigError, LoRAConfig
from lmforge.io import atomic_dir, read_json, write_json
from lmforge.model.checkpoint import load_model, save_model
from lmforge.tokenizer import Tokenizer


class Family(NamedTuple):
    """How PEFT names the adapters of one HF family."""

    slices: dict[str, tuple[str, str]]  # adapter slice -> (our layer in a Block, PEFT module)
    targets: dict[str, str]  # lora.targets name -> the slice it adapts
    layers: str  # PEFT's path to the layer list, under `base_model.model.`
    fan_in_fan_out: bool  # PEFT's flag for Conv1D weights, stored (in, out)


LLAMA = Family(
    slices={
        "q": ("attn.wqkv", "self_attn.q_proj"),
        "k": ("attn.wqkv", "self_attn.k_proj"),
        "v": ("attn.wqkv", "self_attn.v_proj"),
        "o": ("attn.wo", "self_attn.o_proj"),
        "gate": ("mlp.w13", "mlp.gate_proj"),
        "up": ("mlp.w13", "mlp.up_proj"),
        "down": ("mlp.w2", "mlp.down_proj"),
    },
    targets={t: t for t in ("q", "k", "v", "o", "gate", "up", "down")},
    layers="model.layers",  # PeftModelForCausalLM > LlamaForCausalLM > LlamaModel
    fan_in_fan_out=False,
)
GPT2 = Family(
    slices={
        "qkv": ("attn.wqkv", "attn.c_attn"),  # one adapter over all 3 * dim outputs, as PEFT's
        "o": ("attn.wo", "attn.c_proj"),
        "up": ("mlp.w1", "mlp.c_fc"),
        "down": ("mlp.w2", "mlp.c_proj"),  # `c_proj` alone in target_modules names both
    },
    targets={"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "up": "up", "down": "down"},
    layers="transformer.h",  # PeftModelForCausalLM > GPT2LMHeadModel > GPT2Model
    fan_in_fan_out=True,
)
# Mixtral and Qwen2-MoE: Llama's attention names; their experts are stacked tensors, not linear
# layers, so they are not adapted (the default targets then mean the four attention projections)
MIXTRAL = Family(
    slices={t: LLAMA.slices[t] for t in ("q", "k", "v", "o")},
    targets={t: t for t in ("q", "k", "v", "o")},
    layers="model.layers",
    fan_in_fan_out=False,
)
FAMILIES = {"llama": LLAMA, "qwen2": LLAMA, "mistral": LLAMA, "gpt2": GPT2, "mixtral": MIXTRAL}
FAMILIES["qwen2_moe"] = MIXTRAL
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base`) plus adapters on some of its named output slices.

    `slices` names every consecutive slice of the output (`{"q": 512, "k": 128, "v": 128}`);
    adapters are created for those in `targets`. Parameters are `lora_A.<slice>` (r, in) and
    `lora_B.<slice>` (slice size, r), so state_dict keys read `...wqkv.lora_A.q`.
    """

    def __init__(
        self, base: nn.Linear, slices: dict[str, int], targets, r: int, alpha: float, dropout: float
    ):
        super().__init__()
        assert sum(slices.values()) == base.out_features, (
            f"slices {slices} do not add up to the layer's {base.out_features} outputs"
        )
        self.base = base
        self.r, self.alpha, self.dropout_p, self.scale = r, alpha, dropout, alpha / r
        starts = itertools.accumulate(slices.values(), initial=0)
        self.spans = {
            s: (start, n) for (s, n), start in zip(slices.items(), starts) if s in targets
        }
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.ParameterDict(
            {s: nn.Parameter(torch.empty(r, base.in_features, **kw)) for s in self.spans}
        )
        self.lora_B = nn.ParameterDict(
            {s: nn.Parameter(torch.zeros(n, r, **kw)) for s, (_, n) in self.spans.items()}
        )
        # one Dropout per slice, as PEFT has one per module: every adapter draws its own mask
        self.dropout = nn.ModuleDict(
            {s: nn.Dropout(dropout) if dropout else nn.Identity() for s in self.spans}
        )

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def reset_parameters(self, generator: torch.Generator | None = None):
        """PEFT's default: A Kaiming-uniform like nn.Linear, B zero, so training starts at the
        base model exactly."""
        for s in self.spans:
            nn.init.kaiming_uniform_(self.lora_A[s], a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B[s])

    def delta(self, s: str) -> torch.Tensor:
        """scale * B @ A for slice s: what merging adds to its rows of the base weight."""
        return self.scale * (self.lora_B[s] @ self.lora_A[s])

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer applies (base plus adapters), built on each read: code that
        multiplies `.weight` itself (infer/cpu_decode.py) then decodes with the adapters too."""
        w, pieces, end = self.base.weight, [], 0
        for s, (start, n) in self.spans.items():  # in row order
            pieces += [w[end:start], w[start : start + n] + self.delta(s)]
            end = start + n
        return torch.cat([*pieces, w[end:]])

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias  # adapters add none (PEFT's bias="none")

    def forward(self, x):
        y = self.base(x)  # (..., out)
        for s, (start, n) in self.spans.items():
            update = F.linear(F.linear(self.dropout[s](x), self.lora_A[s]), self.lora_B[s])
            y.narrow(-1, start, n).add_(update, alpha=self.scale)  # in place: one output tensor
        return y


# --------------------------------------------------------------------------- applying and merging


def _slices(cfg, fam: Family, fused: str, base: nn.Linear) -> dict[str, int]:
    """The named output slices of one fused layer, in row order."""
    names = [s for s, (layer, _) in fam.slices.items() if layer == fused]
    if len(names) == 1:  # the whole layer: o, down; GPT-2's qkv and up
        return {names[0]: base.out_features}
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    sizes = {"q": q, "k": kv, "v": kv, "gate": cfg.ffn_dim, "up": cfg.ffn_dim}
    return {s: sizes[s] for s in names}


def _family(model: nn.Module) -> Family:
    arch = model.cfg.arch
    if arch not in FAMILIES:
        raise ConfigError(
            f"LoRA is not supported for model arch {arch!r}: lmforge adapts {', '.join(FAMILIES)}"
            " models, whose PEFT module names it knows"
        )
    return FAMILIES[arch]


def _check_model(model: nn.Module, adapted_ok: bool = False) -> Family:
    fam = _family(model)
    if not adapted_ok and any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError("the model already has LoRA adapters: merge_lora it before adding more")
    return fam


def _target_slices(targets, fam: Family, arch: str) -> set[str]:
    """lora.targets -> the family's adapter slices. A slice covering several targets (GPT-2's
    c_attn: q, k, v) is one PEFT module with one adapter, so it needs all of them named."""
    named = set(targets)
    if named == set(LORA_TARGETS):  # all seven (the default) means every projection there is
        named = set(fam.targets)
    unknown = sorted(named - fam.targets.keys())
    if unknown:
        raise ConfigError(
            f"lora.targets: a {arch} model has no {unknown[0]!r} projection; choose from"
            f" {', '.join(fam.targets)}"
        )
    for s in {fam.targets[t] for t in named}:
        group = [t for t, s2 in fam.targets.items() if s2 == s]
        if not named.issuperset(group):
            module = fam.slices[s][1].rpartition(".")[2]
            raise ConfigError(
                f"lora.targets: {arch} fuses {'/'.join(group)} into one {module} adapter in PEFT,"
                f" so name {', '.join(group)} together (got {', '.join(sorted(named & set(group)))})"
            )
    return {fam.targets[t] for t in named}


def _wrap(model, fam: Family, per_layer: list[set[str]], r: int, alpha: float, dropout: float):
    """Replace every fused layer that has a slice in per_layer[i] by a LoRALinear; freeze all
    other parameters. Returns the new LoRALinears in layer order."""
    wrapped = []
    for i, block in enumerate(model.layers):
        for fused in dict.fromkeys(fam.slices[s][0] for s in fam.slices if s in per_layer[i]):
            parent_name, attr = fused.split(".")
            parent = getattr(block, parent_name)
            base = getattr(parent, attr)
            slices = _slices(model.cfg, fam, fused, base)
            m = LoRALinear(base, slices, per_layer[i], r, alpha, dropout)
            setattr(parent, attr, m.train(model.training))  # new Dropouts would start in train
            wrapped.append(m)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in wrapped:
        for p in [*m.lora_A.values(), *m.lora_B.values()]:
            p.requires_grad_(True)
    return wrapped


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int | None = None) -> nn.Module:
    """Add adapters to cfg.targets in every layer and freeze everything else, in place; the base
    weights keep their values. r = 0 means full fine-tuning: the model is returned untouched.
    `seed` makes the A initialisation reproducible (B starts at zero)."""
    if cfg.r == 0:
        return model
    fam = _check_model(model)
    slices = _target_slices(cfg.targets, fam, model.cfg.arch)
    wrapped = _wrap(model, fam, [slices] * len(model.layers), cfg.r, cfg.alpha, cfg.dropout)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=wrapped[0].base.weight.device).manual_seed(seed)
    for m in wrapped:
        m.reset_parameters(gen)
    return model


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its rows of the base weight and put the plain nn.Linear back, in
    place: the result is an ordinary GPT (save_model writes it). Parameters keep the
    requires_grad that apply_lora gave them."""
    for name, m in _lora_layers(model):
        w = m.base.weight
        for s, (start, n) in m.spans.items():
            delta = m.scale * (m.lora_B[s].float() @ m.lora_A[s].float())  # fp32 even for bf16
            w.narrow(0, start, n).add_(delta.to(w.dtype))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, m.base)
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the model had before apply_lora (same keys, current base weights)."""
    wrapped = [name for name, _ in _lora_layers(model)]
    out = {}
    for key, t in model.state_dict().items():
        owner = next((n for n in wrapped if key.startswith(n + ".")), None)
        if owner is None:
            out[key] = t
        elif key.startswith(owner + ".base."):
            out[owner + key[len(owner) + len(".base") :]] = t
    return out


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- PEFT directories


def _target_modules(fam: Family, used: set[str]) -> list[str]:
    """PEFT's target_modules for the adapted slices: the module's last name (`q_proj`, `c_attn`)
    unless that also names a module left unadapted (GPT-2's `c_proj` is attn's and mlp's): then
    the longer `attn.c_proj`, which PEFT matches as a suffix too."""
    hf = {s: module for s, (_, module) in fam.slices.items()}
    out = []
    for s in (s for s in fam.slices if s in used):
        short = hf[s].rpartition(".")[2]
        twins = {t for t, module in hf.items() if module.rpartition(".")[2] == short}
        name = short if twins <= used else hf[s]
        out += [name] if name not in out else []
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_path: str = "") -> None:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does, atomically:
    `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out_dir)` opens it."""
    layers = _lora_layers(model)
    if not layers:
        raise ConfigError(
            "the model has no LoRA adapters to save (apply_lora or load_adapter first)"
        )
    fam = _family(model)
    hyper = {(m.r, m.alpha, m.dropout_p) for _, m in layers}
    assert len(hyper) == 1, f"adapters differ in (r, alpha, dropout): {sorted(hyper)}"
    r, alpha, dropout = hyper.pop()
    tensors, used = {}, set()
    for name, m in layers:
        i = int(name.split(".")[1])  # "layers.{i}.attn.wqkv"
        for s in m.spans:
            hf = f"base_model.model.{fam.layers}.{i}.{fam.slices[s][1]}"
            tensors[hf + ".lora_A.weight"] = m.lora_A[s].detach().cpu().contiguous()
            tensors[hf + ".lora_B.weight"] = m.lora_B[s].detach().cpu().contiguous()
            used.add(s)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path or None,
        "r": r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(fam, used),
        "bias": "none",
        "fan_in_fan_out": fam.fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / CONFIG_FILE, config)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})


# adapter_config.json keys whose non-default values change the math in ways we do not implement
UNSUPPORTED = {
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r))",
    "use_dora": "weight-decomposed LoRA (DoRA)",
    "lora_bias": "adapter biases",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "modules_to_save": "fully trained extra modules",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "adapters on raw parameters",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "megatron_config": "Megatron parallel layers",
}
# initialisations that also rewrote the base weights: the adapter is useless on the original base
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _read_adapter_config(path: Path, fam: Family, arch: str) -> tuple[int, float, float]:
    """(r, alpha, dropout) from adapter_config.json for a model of `arch`; anything we would
    compute differently is an error naming the key and the file."""
    try:
        conf = read_json(path, "adapter config")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None

    def refuse(key: str, why: str):
        raise ConfigError(f"{path}: {key} = {conf.get(key)!r}: {why}")

    if conf.get("peft_type") != "LORA":
        refuse("peft_type", "lmforge loads LoRA adapters only")
    for key, what in UNSUPPORTED.items():
        if conf.get(key):
            refuse(key, f"{what} is not supported by lmforge's LoRA")
    if bool(conf.get("fan_in_fan_out")) != fam.fan_in_fan_out:
        refuse(
            "fan_in_fan_out",
            f"expected {str(fam.fan_in_fan_out).lower()} for a {arch} model (true marks Conv1D"
            " weights stored (in, out), which only GPT-2 has)",
        )
    if conf.get("bias", "none") != "none":
        refuse("bias", "trained biases are not supported; expected 'none'")
    init = conf.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        refuse("init_lora_weights", "this initialisation also changed the base weights")
    r, alpha = conf.get("r"), conf.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        refuse("r", "expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        refuse("lora_alpha", "expected a number")
    targets = conf.get("target_modules")
    if isinstance(targets, list):  # a string is a regex (or "all-linear"): the tensors decide
        known = list(dict.fromkeys(hf.rpartition(".")[2] for _, hf in fam.slices.values()))
        unknown = [t for t in targets if t.rpartition(".")[2] not in known]
        if unknown:
            refuse(
                "target_modules",
                f"lmforge cannot adapt {unknown[0]!r} in a {arch} model; known: {', '.join(known)}",
            )
    return r, float(alpha), float(conf.get("lora_dropout") or 0.0)


def _read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickled = path.with_name("adapter_model.bin").exists()
        hint = " (adapter_model.bin is a pickle, which lmforge does not open)" if pickled else ""
        raise ConfigError(f"adapter weights not found: {path}{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is corrupt or truncated ({e})") from None


def _parse_adapter(model: nn.Module, adapter_dir: Path, adapted_ok: bool = False):
    """(r, alpha, dropout, {(layer, slice): {"A": t, "B": t}}) of an adapter directory, every
    name and shape checked against `model`."""
    fam = _check_model(model, adapted_ok)
    r, alpha, dropout = _read_adapter_config(adapter_dir / CONFIG_FILE, fam, model.cfg.arch)
    path = adapter_dir / WEIGHTS_FILE
    tensors = _read_adapter_tensors(path)
    # PEFT names `[base_model.model.][model.]layers.{i}.self_attn.q_proj.lora_A.weight` (GPT-2:
    # `transformer.h.{i}.attn.c_attn`); files from old PEFT versions may add `.default` (the
    # adapter name) before `.weight`
    outer, inner = (re.escape(p) for p in fam.layers.split("."))
    pattern = re.compile(
        rf"^(?:base_model\.model\.)?(?:{outer}\.)?{inner}\.(\d+)\.(\w+\.\w+)\.lora_([AB])(?:\.\w+)?\.weight$"
    )
    modules = {hf: s for s, (_, hf) in fam.slices.items()}  # "self_attn.q_proj" -> "q"
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None or m[2] not in modules:
            raise ConfigError(
                f"{path}: tensor {key!r} is not a LoRA weight of a module lmforge adapts"
                f" ({', '.join(modules)} in {fam.layers}.N)"
            )
        i, s = int(m[1]), modules[m[2]]
        if i >= len(model.layers):
            raise ConfigError(
                f"{path}: tensor {key!r} is for layer {i}; the model has {len(model.layers)}"
            )
        found.setdefault((i, s), {})[m[3]] = t
    if not found:
        raise ConfigError(f"{path}: holds no LoRA tensors")
    for (i, s), ab in found.items():
        fused, hf = fam.slices[s]
        base = model.layers[i].get_submodule(fused)
        base = base.base if isinstance(base, LoRALinear) else base
        shapes = {"A": (r, base.in_features), "B": (_slices(model.cfg, fam, fused, base)[s], r)}
        for which, shape in shapes.items():
            name = f"{fam.layers}.{i}.{hf}.lora_{which}.weight"
            if which not in ab:
                raise ConfigError(f"{path}: {name} is missing (its pair is there)")
            if tuple(ab[which].shape) != shape:
                raise ConfigError(
                    f"{path}: {name} has shape {tuple(ab[which].shape)}; r = {r} and the model"
                    f" imply {shape}"
                )
    return fam, r, alpha, dropout, found


def _copy_adapter(model: nn.Module, fam: Family, found) -> None:
    with torch.no_grad():
        for (i, s), ab in found.items():
            m = model.layers[i].get_submodule(fam.slices[s][0])
            m.lora_A[s].copy_(ab["A"])  # copy_ casts to the model's dtype and device
            m.lora_B[s].copy_(ab["B"])


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a PEFT LoRA directory (ours, or PEFT's for a Llama-style or GPT-2 model) to `model`,
    in place, with the base frozen as after apply_lora. Everything is checked before the model
    is touched, so an error leaves it as it was."""
    fam, r, alpha, dropout, found = _parse_adapter(model, Path(adapter_dir))
    per_layer = [{s for (j, s) in found if j == i} for i in range(len(model.layers))]
    _wrap(model, fam, per_layer, r, alpha, dropout)
    _copy_adapter(model, fam, found)
    return model


def load_adapter_weights(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Copy a saved adapter into a model that already carries the same adapters (resuming)."""
    adapter_dir = Path(adapter_dir)
    fam, r, alpha, _, found = _parse_adapter(model, adapter_dir, adapted_ok=True)
    have = {
        (i, s)
        for i, layer in enumerate(model.layers)
        for m in layer.modules()
        if isinstance(m, LoRALinear)
        for s in m.spans
    }
    wrapped = _lora_layers(model)
    if have != set(found) or any(m.r != r or m.scale != alpha / r for _, m in wrapped):
        raise ConfigError(
            f"{adapter_dir}: its adapters (r={r}, {len(found)} projections) differ from the "
            f"model's ({len(have)} projections); was lora.r or lora.targets changed?"
        )
    _copy_adapter(model, fam, found)
    return model


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None) -> Path:
    """Base model + adapter -> a plain HF checkpoint in out_dir (which must not exist)."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists; choose a new output directory")
    base = base or read_json(adapter_dir / CONFIG_FILE, "adapter config").get(
        "base_model_name_or_path"
    )
    if not base or not Path(base).is_dir():
        raise ConfigError(
            f"{adapter_dir / CONFIG_FILE}: base model {base!r} is not a directory here; "
            "pass --base DIR"
        )
    model = merge_lora(load_adapter(load_model(base, quantized_ok=False), adapter_dir))
    tok = Tokenizer.load(base)
    with atomic_dir(out_dir) as tmp:
        save_model(model, tmp, base, pad_token_id=tok.pad_id)
    return out_dir
