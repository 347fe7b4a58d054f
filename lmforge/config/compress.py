"""The compression sections: `quantize:`, `distill:` and `prune:`."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.config.base import ConfigError, check_choice, check_positive
from lmforge.config.train import PretrainConfig

QUANT_METHODS = ("int8", "int4", "gptq")
GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantizeConfig:  # `quantize:` weight-only quantization of a trained model (lmforge quantize)
    method: str = "int8"  # int8 (per output channel) | int4 (group-wise, round to nearest) | gptq (int4, GPTQ)
    group_size: int = 64  # int4, gptq: weights sharing one scale and zero point (32, 64 or 128)
    head_bits: int = 8  # output head (and a tied embedding): 8 = int8 per row, 0 = keep in float
    outlier_threshold: float = 0.0  # int8: input features whose calibration activations exceed this stay float (LLM.int8 uses 6; 0 = off)
    max_outliers: int = 0  # int8: at most this many float features per layer (0 = no limit)
    calib_samples: int = (
        64  # gptq and outliers: calibration sequences drawn from the training shards
    )
    calib_seq_len: int = 256  # tokens per calibration sequence
    damp: float = 0.01  # gptq: added to the Hessian diagonal, as a fraction of its mean
    block_size: int = 128  # gptq: columns per lazy batch update
    act_order: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
    eval_tokens: int = (
        32768  # validation tokens per language for the perplexity before and after (0 = skip)
    )
    seed: int = 0  # picks the calibration sequences
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    methods: list[str] = field(
        default_factory=list
    )  # lmforge run: quantize the run's final model once per method listed (the other fields apply to each); [] = no quantize stage

    def __post_init__(self):
        check_choice(self, "method", QUANT_METHODS)
        for m in self.methods:
            if m not in QUANT_METHODS:
                raise ConfigError(
                    f"quantize.methods: {m!r} is not one of {', '.join(QUANT_METHODS)}"
                )
        check_choice(self, "device", ("auto", "cpu", "cuda", "mps"))
        if self.group_size not in GROUP_SIZES:
            raise ConfigError(
                f"quantize.group_size must be one of {', '.join(map(str, GROUP_SIZES))}; "
                f"got {self.group_size}"
            )
        if self.head_bits not in (0, 8):
            raise ConfigError(f"quantize.head_bits must be 8 or 0 (float), got {self.head_bits}")
        check_positive(self, "calib_samples", "calib_seq_len", "block_size")
        if self.damp <= 0 or self.outlier_threshold < 0 or self.max_outliers < 0:
            raise ConfigError("quantize.damp must be > 0, outlier_threshold and max_outliers >= 0")
        if self.eval_tokens < 0:
            raise ConfigError(f"quantize.eval_tokens must be >= 0, got {self.eval_tokens}")


@dataclass
class DistillConfig(
    PretrainConfig
):  # `distill:` train a smaller student on a teacher's logits (lmforge distill)
    max_steps: int = 200  # optimizer steps (the baseline student trains as many)
    batch_size: int = 8  # sequences per micro-batch
    lr: float = 3e-3  # peak learning rate
    warmup_steps: int = 20  # linear warmup from 0 to the peak
    eval_every: int = 50  # evaluate validation loss every N steps (0 = only at the end)
    save_every: int = 100  # write a checkpoint every N steps (0 = only at the end)
    dim: int = 128  # student width (the rest of its shape follows the teacher unless set here)
    n_layer: int = 0  # student layers (0 = the teacher's)
    n_head: int = 0  # student attention heads (0 = dim / the teacher's head_dim)
    n_kv_head: int = 0  # student key/value heads (0 = n_head)
    ffn_dim: int = 0  # student MLP width (0 = the model default for its width)
    temperature: float = 1.0  # softens both distributions in the KL term (Hinton et al. 2015)
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy
    baseline: bool = True  # also train the same student without a teacher, for comparison

    def __post_init__(self):
        super().__post_init__()
        if self.temperature <= 0 or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("distill.temperature must be > 0 and distill.alpha in [0, 1]")
        if min(self.dim, self.n_layer, self.n_head, self.n_kv_head, self.ffn_dim) < 0:
            raise ConfigError(
                "distill: student dim, n_layer, n_head, n_kv_head, ffn_dim must be >= 0"
            )
        check_positive(self, "dim")


PRUNE_METHODS = ("magnitude", "2:4", "structured")


@dataclass
class PruneConfig(
    PretrainConfig
):  # `prune:` remove weights, then optionally recover (lmforge prune)
    method: str = "magnitude"  # magnitude (unstructured) | 2:4 (two of every four inputs) | structured (heads, MLP channels)
    sparsity: float = 0.5  # magnitude: fraction of each matrix's weights set to zero
    heads: float = 0.25  # structured: fraction of attention heads removed from every layer
    ffn: float = 0.25  # structured: fraction of MLP channels removed from every layer
    calib_samples: int = (
        32  # structured: sequences from the training shards that score heads and channels
    )
    max_steps: int = (
        0  # recovery fine-tune steps on the pretraining corpus (0 = none); pruned weights stay zero
    )
    lr: float = 3e-4  # recovery: peak learning rate
    warmup_steps: int = 10  # recovery: linear warmup
    eval_every: int = 0  # recovery: validation every N steps (0 = only at the end)
    save_every: int = 0  # recovery: checkpoint every N steps (0 = only at the end)

    def __post_init__(self):
        recover = self.max_steps
        self.max_steps = max(recover, 1)  # the loop fields are checked as if a recovery ran
        super().__post_init__()
        self.max_steps = recover
        check_choice(self, "method", PRUNE_METHODS)
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"prune.sparsity must be in [0, 1), got {self.sparsity}")
        if not (0.0 <= self.heads < 1.0 and 0.0 <= self.ffn < 1.0):
            raise ConfigError("prune.heads and prune.ffn must be in [0, 1)")
        if recover < 0:
            raise ConfigError(f"prune.max_steps must be >= 0, got {recover}")
        check_positive(self, "calib_samples")
