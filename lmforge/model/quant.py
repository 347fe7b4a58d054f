"""Weight-only quantization: int8 per output channel, int4 group-wise with packed storage, a
`QuantLinear` that multiplies without materialising float weights, and the checkpoint layout.

The one idea: only the weights are quantized; activations stay float32. Each linear layer of
the Transformer blocks (and, by default, the output head) keeps small integers plus scales:

- int8: w[n, k] = q[n, k] * scale[n], symmetric, q in [-127, 127], scale = max |w[n]| / 127.
- int4: w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g] for the group g = k // group_size,
  asymmetric, q in [0, 15] spanning the group's [min, max]; the zero point is a float (so the
  grid starts at the group's minimum, as llama.cpp's Q4_1 does, rather than an integer zero
  point that puts 0 on the grid as GPTQ's reference quantizer does: weights imported from a
  Q4_1 GGUF then sit on their own grid again). Two values per byte, in blocks of 32: byte i holds value i of the block in
  its low nibble and value i + 16 in its high nibble. Scales and zero points are
  stored as float16.
- outliers (int8, LLM.int8-style): input features whose calibration activations exceed a
  threshold keep their weight columns in float (`outlier_idx`, `outlier_weight`); the int8 part
  has zeros there, so the rest of each row gets a finer scale.

A quantized checkpoint is a model directory whose config.json has the family's HF fields plus
`quantization_config` ({"quant_method": "lmforge", ...}); its model.safetensors holds lmforge's
own module names (q/k/v fused as `wqkv`, gate/up as `w13`), with `<module>.qweight`, `.scales`,
`.zeros` (int4), `.outlier_idx`, `.outlier_weight` for each quantized linear, and ordinary
tensors for the rest; `model/checkpoint.py` writes and reads it, docs/compression.md documents
it. transformers does not open it (no quantization backend of theirs has this layout): export
the float model to GGUF for llama.cpp.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import GROUP_SIZES, ConfigError
from lmforge.io import read_json
from lmforge.model import kernels
from lmforge.model.transformer import GPT

FORMAT_VERSION = 1
BLOCK = 32  # int4 packing block: the unit of the nibble order, and the smallest group size


# --------------------------------------------------------------------------- the numbers


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8 in [-127, 127], scale (N,) float32, per output row."""
    w = w.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int4_params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale (N, G) and zero point (N, G), float32 and float16-representable,
    for each group of `group_size` inputs: the group's [min, max] over 15 steps, min at q = 0."""
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15.0).half().float()  # stored as float16: quantize with that value
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0
    zero = (-lo / scale).half().float()
    return scale, zero


def quantize_int4(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Values q (N, K) uint8 in [0, 15] of w for per-group scale and zero (N, K // group_size)."""
    s = scale.repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    return torch.round(w.float() / s + z).clamp_(0, 15).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K // 2) uint8; K a multiple of 32 (see the module doc)."""
    N, K = q.shape
    b = q.to(torch.uint8).view(N, K // BLOCK, 2, BLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (N, K // 2) uint8 -> (N, K) uint8 values in [0, 15]."""
    N, half = packed.shape
    b = packed.view(N, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat((b & 0x0F, b >> 4), dim=2).reshape(N, 2 * half)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    q = unpack_int4(packed).float()
    N, K = q.shape
    q = q.view(N, K // group_size, group_size) - zero.float()[:, :, None]
    return (q * scale[:, :, None]).view(N, K)


def check_group(in_features: int, group_size: int, where: str) -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(
            f"group size {group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}"
        )
    if in_features % group_size:
        raise ConfigError(
            f"{where}: input dimension {in_features} is not divisible by the group size "
            f"{group_size}; pick a group size that divides it"
        )


# --------------------------------------------------------------------------- the layer


class QuantLinear(nn.Module):
    """A linear layer with int8 or packed int4 weights. forward: y = x W^T + b with W never held
    in float when the kernels apply (CPU, float32, at most kernels.MAX_ROWS rows: decoding);
    larger batches (prefill, evaluation) and other devices dequantise W and use F.linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 0,
        bias: bool = False,
        n_outliers: int = 0,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        kw = {"device": device}
        if bits == 8:
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, **kw)
            )
            self.register_buffer("scales", torch.ones(out_features, **kw))
            self.zeros = None
        elif bits == 4:
            check_group(in_features, group_size, "QuantLinear")
            G = in_features // group_size
            self.register_buffer(
                "qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, **kw)
            )
            self.register_buffer("scales", torch.ones(out_features, G, **kw))
            self.register_buffer("zeros", torch.zeros(out_features, G, **kw))
        else:
            raise ConfigError(f"QuantLinear: bits must be 8 or 4, got {bits}")
        self.register_buffer("bias", torch.zeros(out_features, **kw) if bias else None)
        if n_outliers:
            self.register_buffer("outlier_idx", torch.zeros(n_outliers, dtype=torch.long, **kw))
            self.register_buffer("outlier_weight", torch.zeros(out_features, n_outliers, **kw))
        else:
            self.outlier_idx = self.outlier_weight = None

    @classmethod
    def from_float(
        cls, linear: nn.Linear, bits: int, group_size: int = 0, outliers: torch.Tensor | None = None
    ) -> QuantLinear:
        """Round-to-nearest quantization of `linear`; `outliers` (int8 only): input feature
        indices kept in float."""
        w = linear.weight.detach().float()
        n_out = 0 if outliers is None else len(outliers)
        m = cls(
            linear.in_features,
            linear.out_features,
            bits,
            group_size,
            linear.bias is not None,
            n_out,
            w.device,
        )
        if n_out:
            m.outlier_idx.copy_(outliers)
            m.outlier_weight.copy_(w[:, outliers])
            w = w.clone()
            w[:, outliers] = 0.0
        if bits == 8:
            q, s = quantize_int8(w)
            m.qweight.copy_(q)
            m.scales.copy_(s)
        else:
            check_group(w.shape[1], group_size, "QuantLinear")
            s, z = int4_params(w, group_size)
            m.set_int4(quantize_int4(w, s, z, group_size), s, z)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m

    def set_int4(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Store int4 values q (N, K), scale and zero (N, K // group_size)."""
        self.qweight.copy_(pack_int4(q))
        self.scales.copy_(scale)
        self.zeros.copy_(zero)

    def dequantize(self) -> torch.Tensor:
        """The float (N, K) weight this layer computes with."""
        if self.bits == 8:
            w = self.qweight.float() * self.scales[:, None]
        else:
            w = dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size)
        if self.outlier_idx is not None:
            w[:, self.outlier_idx] = self.outlier_weight
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if (
            x2.shape[0] <= kernels.MAX_ROWS
            and x2.device.type == "cpu"
            and x2.dtype == torch.float32
            and self.in_features % BLOCK == 0
            and kernels.available()
        ):
            x2 = x2.contiguous()
            if self.bits == 8:
                y = kernels.q8_matmul(x2, self.qweight, self.scales)
            else:
                y = kernels.q4_matmul(x2, self.qweight, self.scales, self.zeros, self.group_size)
            if self.outlier_idx is not None:
                y.addmm_(x2[:, self.outlier_idx], self.outlier_weight.t())
            if self.bias is not None:
                y += self.bias
        else:
            w = self.dequantize().to(x.dtype)
            y = F.linear(x2, w, None if self.bias is None else self.bias.to(x.dtype))
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.bits == 4 else ""
        o = f", outliers={len(self.outlier_idx)}" if self.outlier_idx is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}{g}{o}"


class QuantEmbedding(nn.Module):
    """The input embedding of a tied model whose output head is int8: the head's row v is token
    v's embedding, so the lookup gathers int8 rows and scales them (no float copy is kept)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        assert head.bits == 8 and head.outlier_idx is None
        self.head = [head]  # a list: not a submodule, so its buffers are saved once (as lm_head)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.head[0]
        return F.embedding(idx, h.qweight).float() * F.embedding(idx, h.scales[:, None])


# --------------------------------------------------------------------------- whole models


def block_linears(model: GPT) -> dict[str, nn.Linear]:
    """The Transformer blocks' linear layers by module name (what int4/GPTQ quantize). A mixture
    of experts' router and shared-expert gate stay float: tiny, and a rounding error there
    changes which expert runs or how much."""
    return {
        name: m
        for name, m in model.named_modules()
        if name.startswith("layers.")
        and isinstance(m, nn.Linear)
        and not name.endswith((".router", ".shared_gate"))
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def quantize_head(model: GPT) -> None:
    """Output head -> int8 per row; a tied input embedding then reads the same int8 rows."""
    head = QuantLinear.from_float(model.lm_head, 8)
    model.lm_head = head
    if model.cfg.tie_embeddings:
        model.tok_emb = QuantEmbedding(head)


@dataclasses.dataclass
class QuantSpec:
    """What quantization_config records: enough to rebuild the modules before loading tensors."""

    method: str  # int8 | int4 | gptq
    bits: int
    group_size: int
    head_bits: int
    outliers: dict[str, int]  # module name -> number of float input features
    modules: list[str]  # quantized block linears

    def to_json(self) -> dict:
        return {"quant_method": "lmforge", "format_version": FORMAT_VERSION} | dataclasses.asdict(
            self
        )

    @classmethod
    def from_json(cls, d: dict, where: str) -> QuantSpec:
        if d.get("quant_method") != "lmforge":
            raise ConfigError(
                f"{where}: quantization_config.quant_method {d.get('quant_method')!r} is not "
                "supported (lmforge opens its own quantized checkpoints, and float ones)"
            )
        if d.get("format_version") != FORMAT_VERSION:
            raise ConfigError(
                f"{where}: quantized format version {d.get('format_version')} is not "
                f"{FORMAT_VERSION}; requantize the float model with this lmforge"
            )
        try:
            return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})
        except KeyError as e:
            raise ConfigError(f"{where}: quantization_config lacks {e}") from None


def build_quantized(model: GPT, spec: QuantSpec) -> GPT:
    """Swap the modules `spec` names for empty QuantLinear layers of the right shapes (the
    caller then loads the tensors)."""
    for name in spec.modules:
        lin = model.get_submodule(name)
        ql = QuantLinear(
            lin.in_features,
            lin.out_features,
            spec.bits,
            spec.group_size,
            lin.bias is not None,
            spec.outliers.get(name, 0),
            device=lin.weight.device,
        )
        set_module(model, name, ql)
    if spec.head_bits == 8:
        quantize_head(model)
    return model


def quant_spec(ckpt: Path) -> QuantSpec | None:
    """The QuantSpec of a checkpoint directory, or None for a float checkpoint."""
    cfg = read_json(ckpt / "config.json", "checkpoint config")
    q = cfg.get("quantization_config")
    return None if q is None else QuantSpec.from_json(q, str(ckpt / "config.json"))
