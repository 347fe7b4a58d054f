"""`lmforge plan`: the compute-optimal model size and token count for a compute budget, and the
recipe sections that realise it.

The one idea (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models",
arXiv:2203.15556, approach 3): fit the final loss as L(N, D) = E + A / N^alpha + B / D^beta,
with N parameters and D training tokens, and spend the compute C = 6 N D where L is least. That
gives N_opt = G (C/6)^a and D_opt = (C/6)^b / G, with a = beta / (alpha + beta),
b = alpha / (alpha + beta) and G = (alpha A / (beta B))^(1 / (alpha + beta)).

Two sets of coefficients (`--fit`):
- hoffmann: the paper's approach-3 fit, E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28 (its
  equation 10): 10 tokens per parameter at 1e14 FLOPs, 20 at 1e17, 93 at Chinchilla's 5.8e23
  (a 32B model there, not Chinchilla's 70B);
- epoch (default): Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt"
  (arXiv:2404.10102), who refit approach 3 on data reconstructed from the paper: E 1.8172,
  A 482.01, B 2085.43, alpha 0.3478, beta 0.3658: 32 tokens per parameter at 1e14, 27 at 1e17,
  18 at 5.8e23, in line with the paper's approaches 1 and 2 (~20).
N counts every parameter, the embedding included, as the paper did.
The predicted loss is in the paper's units (its data, its tokenizer): only where the optimum
falls carries over to another dataset, not the loss value.

With a data budget (`--data-tokens`, times `--epochs`, at most 4: Muennighoff et al. 2023,
arXiv:2305.16264, find up to ~4 epochs of repeated data nearly as good as fresh) smaller than
D_opt, the optimum lies on that bound: D = the budget, N = C / (6 D).

The recipe: a Llama-shaped model (SwiGLU, head width 64, tied embeddings) with about N
parameters, the depth / width pair nearest a width of 48 per layer that hits N within the
rounding; the batch size and learning rate from DeepSeek LLM's compute fits (arXiv:2401.02954:
B_opt = 0.2920 C^0.3271 tokens, lr_opt = 0.3118 C^-0.1250), fitted on 1e17-3e20 FLOPs and
extrapolated below that (say so when it is); steps = D / batch tokens.

A budget in hours is turned into FLOPs by measuring this machine: a few real training steps
(forward, backward, AdamW) of the planned shape on random tokens give the achieved FLOP/s,
which for small models is far below the matmul peak; planned again with the new budget, once.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from lmforge.config import ConfigError


@dataclass(frozen=True)
class Fit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimum(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for C = 6 N D FLOPs."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        return g * (flops / 6) ** (self.beta / s), (flops / 6) ** (self.alpha / s) / g


FITS = {
    "epoch": Fit(1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                 "Besiroglu et al. 2024 (arXiv:2404.10102), refit of Hoffmann et al. approach 3"),
    "hoffmann": Fit(1.69, 406.4, 410.7, 0.34, 0.28,
                    "Hoffmann et al. 2022 (arXiv:2203.15556), approach 3, eq. 10"),
}  # fmt: skip
ASPECT = 48  # target width per layer: loss is flat over a wide range of it (Kaplan et al. 2020)
HEAD_DIM = 64
MAX_EPOCHS = 4


def ffn_of(dim: int) -> int:
    """SwiGLU's hidden width: 8/3 dim rounded up to 64s (ModelConfig's default)."""
    return -(-int(8 * dim / 3) // 64) * 64


def count_params(n_layer: int, dim: int, vocab: int) -> int:
    """Parameters of the Llama-shaped model: tied embedding, per layer attention (4 dim^2) and
    SwiGLU (3 dim ffn) and two norms, and the final norm."""
    return vocab * dim + n_layer * (4 * dim * dim + 3 * dim * ffn_of(dim) + 2 * dim) + dim


def shape_for(n: float, vocab: int) -> tuple[int, int]:
    """(n_layer, dim), dim a multiple of 64, with about n parameters: the pair nearest n, ties
    (within 10%) to the width per layer nearest ASPECT."""
    best, pick = None, (1, HEAD_DIM)
    for n_layer in range(1, 129):
        a = n_layer * (4 + 3 * 8 / 3)  # dim^2 terms per layer (ffn ~ 8/3 dim)
        dim_exact = (-vocab + math.sqrt(vocab * vocab + 4 * a * n)) / (2 * a)
        for dim in {max(HEAD_DIM, 64 * math.floor(dim_exact / 64)), 64 * math.ceil(dim_exact / 64)}:
            miss = abs(math.log(count_params(n_layer, dim, vocab) / n))
            score = (round(miss / math.log(1.1)), abs(math.log(dim / n_layer / ASPECT)))
            if best is None or score < best:
                best, pick = score, (n_layer, dim)
    return pick


@dataclass
class Plan:
    flops: float
    fit_name: str
    n_opt: float  # the fit's optimum
    d_opt: float
    n: float  # what is planned (differs from the optimum when data-limited)
    d: float
    data_limited: bool
    n_layer: int
    dim: int
    params: int
    batch_tokens: int
    batch_size: int
    seq_len: int
    steps: int
    lr: float
    extrapolated: bool
    loss: float
    too_small: bool  # N is below the smallest model (1 x 64) this vocabulary allows

    def recipe(self) -> str:
        """The model and pretrain sections of a recipe, as YAML."""
        return (
            f"model:  # {self.params / 1e6:.1f} M parameters (lmforge plan, {self.flops:.2e} FLOPs)\n"
            f"  dim: {self.dim}\n  n_layer: {self.n_layer}\n  n_head: {self.dim // HEAD_DIM}\n"
            f"  max_seq_len: {self.seq_len}\n"
            f"pretrain:  # {self.d / 1e6:.1f} M tokens\n"
            f"  max_steps: {self.steps}\n  batch_size: {self.batch_size}\n"
            f"  seq_len: {self.seq_len}\n  lr: {self.lr:.2e}\n"
            f"  warmup_steps: {max(1, min(self.steps // 20, 1000))}\n  schedule: cosine\n"
        )


def plan(
    flops: float,
    vocab: int,
    seq_len: int = 256,
    fit: str = "epoch",
    data_tokens: float | None = None,
    epochs: int = 1,
) -> Plan:
    """The plan for `flops` of training compute (see the module docstring)."""
    if fit not in FITS:
        raise ConfigError(f"--fit {fit!r}: choose one of {', '.join(FITS)}")
    if not flops > 0 or math.isinf(flops):
        raise ConfigError(f"the compute budget must be a positive number of FLOPs, got {flops}")
    if vocab < 1 or seq_len < 1:
        raise ConfigError("--vocab and --seq-len must be >= 1")
    if not 1 <= epochs <= MAX_EPOCHS:
        raise ConfigError(f"--epochs must be 1..{MAX_EPOCHS} (repeated data beyond ~4 epochs is "
                          "worth much less: Muennighoff et al. 2023)")  # fmt: skip
    if data_tokens is not None and not data_tokens > 0:
        raise ConfigError(f"--data-tokens must be > 0, got {data_tokens}")
    f = FITS[fit]
    n_opt, d_opt = f.optimum(flops)
    n, d, limited = n_opt, d_opt, False
    if data_tokens is not None and d_opt > data_tokens * epochs:
        d, limited = data_tokens * epochs, True
        n = flops / (6 * d)
    n_layer, dim = shape_for(n, vocab)
    params = count_params(n_layer, dim, vocab)
    batch = 0.2920 * flops**0.3271
    lr = 0.3118 * flops**-0.1250
    batch_size = max(1, round(batch / seq_len))
    steps = max(1, round(d / (batch_size * seq_len)))
    return Plan(flops, fit, n_opt, d_opt, n, d, limited, n_layer, dim, params,
                batch_size * seq_len, batch_size, seq_len, steps, lr,
                not 1e17 <= flops <= 3e20, f.loss(params, d),
                n < count_params(1, HEAD_DIM, vocab))  # fmt: skip


# --------------------------------------------------------------------------- this machine


def measure_flops_per_second(n_layer: int, dim: int, vocab: int, seq_len: int, steps: int = 3,
                             batch_size: int = 4) -> float:  # fmt: skip
    """Achieved training FLOP/s of that shape here: `steps` timed steps (after one untimed) of
    forward, backward and AdamW on random tokens, on the CPU, with the threads torch has."""
    import torch
    import torch.nn.functional as F

    from lmforge.config import ModelConfig
    from lmforge.model.transformer import GPT, flops_per_token

    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=dim // HEAD_DIM,
                      max_seq_len=seq_len)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch_size, seq_len + 1))

    def step():
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    return flops_per_token(cfg, seq_len) * batch_size * seq_len / seconds


def flops_for_hours(hours: float, vocab: int, seq_len: int, fit: str, data_tokens, epochs,
                    measure=measure_flops_per_second, log=print) -> tuple[float, float]:  # fmt: skip
    """(FLOPs, FLOP/s) that `hours` of training buys here: measured on the tiny recipe's shape,
    planned, measured again on the planned shape (bigger models run at a higher share of peak)."""
    if not hours > 0:
        raise ConfigError(f"--hours must be > 0, got {hours}")
    rate = measure(4, 192, vocab, seq_len)
    log(f"measured {rate / 1e9:.2f} GFLOP/s training a 4 x 192 model")
    p = plan(rate * hours * 3600, vocab, seq_len, fit, data_tokens, epochs)
    if p.params < 1.5e9:  # a step of anything bigger would take minutes on a CPU
        rate = measure(p.n_layer, p.dim, vocab, seq_len, steps=2, batch_size=1)
        log(f"measured {rate / 1e9:.2f} GFLOP/s training the planned {p.n_layer} x {p.dim} model")
    return rate * hours * 3600, rate


# --------------------------------------------------------------------------- the command


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="the compute-optimal model size and tokens for a budget (Chinchilla), as a recipe",
        description="Given a compute budget (--flops, or --hours of training on this machine, "
        "measured), print the compute-optimal parameter count and token count by the Chinchilla "
        "approach-3 fit (Hoffmann et al. 2022; --fit epoch uses Besiroglu et al. 2024's refit, "
        "the default) and the model and pretrain sections of a recipe that realise it (depth, "
        "width, batch, steps, learning rate). A data budget (--data-tokens) caps the tokens. "
        "See docs/plan.md.",
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--flops", type=float, help="training compute in FLOPs (e.g. 1e15)")
    g.add_argument("--hours", type=float, help="hours of training on this machine (measured)")
    p.add_argument("--data-tokens", type=float, help="tokens of training data there are")
    p.add_argument("--epochs", type=int, default=1,
                   help=f"passes over the data allowed (1..{MAX_EPOCHS}; default: 1)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=8192,
                   help="vocabulary size (default: 8192, the tiny recipe's)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=256, help="context length (default: 256)")
    p.add_argument("--fit", default="epoch", choices=tuple(FITS),
                   help="the scaling-law coefficients (default: epoch)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def cmd_plan(args) -> int:
    import dataclasses
    import json

    rate = None
    flops = args.flops
    if args.hours is not None:
        log = (lambda m: print(m, file=sys.stderr)) if args.json else print
        flops, rate = flops_for_hours(args.hours, args.vocab, args.seq_len, args.fit,
                                      args.data_tokens, args.epochs, log=log)  # fmt: skip
    p = plan(flops, args.vocab, args.seq_len, args.fit, args.data_tokens, args.epochs)
    if args.json:
        print(json.dumps(dataclasses.asdict(p) | {"flops_per_second": rate}))
        return 0
    f = FITS[p.fit_name]
    print(
        f"compute {p.flops:.3g} FLOPs"
        + (f" ({rate / 1e9:.2f} GFLOP/s x {args.hours} h)" if rate else "")
    )
    print(f"fit: {f.source}")
    print(f"compute-optimal: N {p.n_opt / 1e6:.3g} M parameters, D {p.d_opt / 1e6:.3g} M tokens "
          f"({p.d_opt / p.n_opt:.1f} tokens per parameter)")  # fmt: skip
    if p.data_limited:
        print(f"data-limited: {args.data_tokens:.3g} tokens x {args.epochs} epochs < D_opt; "
              f"planned N {p.n / 1e6:.3g} M on D {p.d / 1e6:.3g} M tokens instead")  # fmt: skip
    print(f"model: {p.n_layer} layers x {p.dim} wide, {p.params / 1e6:.2f} M parameters "
          f"(vocabulary {args.vocab}); predicted loss {p.loss:.3f} in the fit's units")  # fmt: skip
    if p.too_small:
        print(f"note: N is below the smallest model a {args.vocab}-token vocabulary allows (its "
              "embedding alone is bigger): the plan is that smallest model; at this budget the "
              "fit, made on models of 70M+ parameters, says little")  # fmt: skip
    print(
        f"batch {p.batch_tokens:,} tokens, {p.steps:,} steps, lr {p.lr:.2e} (DeepSeek LLM's "
        "fits" + (", extrapolated outside 1e17-3e20 FLOPs" if p.extrapolated else "") + ")"
    )
    print("\n" + p.recipe(), end="")
    return 0
