"""Distributed training on PyTorch's own engine: `torchrun` starts the processes and sets RANK,
WORLD_SIZE and LOCAL_RANK; this file turns them into a process group, a device mesh and a
parallelized model.

The one idea: ranks form a (dp, tp) grid. The tp ranks of a row split every layer between them
(tensor parallelism) and see the same data; the dp rows each read their own slice of every
global batch (the loader is a pure function of (seed, position, dp rank)) and keep the same
weights, by averaging gradients (DDP: every rank holds the whole model) or by sharding
parameters, gradients and optimizer state (FSDP2). A rank that fails takes the others down with
it: torchrun stops the remaining workers, and collectives time out instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

from lmforge.config import ConfigError, DistConfig, ModelConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    tp: int = 1  # ranks that split each layer; consecutive ranks (one node) form a tp group
    mesh: object = field(default=None, compare=False)  # DeviceMesh ("dp", "tp") when sharded

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors spread over ranks (FSDP2 or tensor parallel): every rank must
        take part in every forward pass, and checkpoints go through torch.distributed.checkpoint."""
        return self.tp > 1 or (self.strategy == "fsdp" and self.dp_size > 1)


def setup(cfg: DistConfig) -> DistInfo:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA) and build the
    (dp, tp) device mesh; a single process when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % cfg.tp:
        raise ConfigError(f"dist.tp ({cfg.tp}) must divide the number of processes ({world})")
    dp = world // cfg.tp
    if world == 1:
        return DistInfo(strategy=cfg.strategy)
    if dp > 1 and cfg.strategy == "none":
        raise ConfigError(
            f"started by torchrun with {world} processes but dist.strategy is none: "
            f"pass --dist.strategy ddp or fsdp"
        )
    if dp > 1 and cfg.tp > 1 and cfg.strategy == "ddp":
        raise ConfigError(
            "tensor parallelism combines with fsdp, not ddp: pass --dist.strategy fsdp"
        )
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.timeout_s)
        )
    info = DistInfo(rank, world, local, cfg.strategy, cfg.tp)
    if info.sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            "cuda" if cuda else "cpu", (dp, cfg.tp), mesh_dim_names=("dp", "tp")
        )
        info = DistInfo(rank, world, local, cfg.strategy, cfg.tp, mesh)
    return info


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(cfg: DistConfig | None, train, *args):
    """train(*args, cfg, info) inside the process group (or alone), left again however it ends."""
    cfg = cfg or DistConfig()
    info = setup(cfg)
    try:
        return train(*args, cfg, info)
    except Exception as e:
        if info.world_size > 1:
            exit_failed_rank(e, info)
        raise
    finally:
        teardown()


def exit_failed_rank(e: Exception, info: DistInfo) -> None:
    """Print the error and leave at once, skipping destructors. A rank that unwinds normally
    frees DDP's reducer and the gloo process group while its peers wait in a collective, and
    that can deadlock (the group's destructor joins a worker thread that needs the GIL to free
    a finished work's tensors): the rank then never exits and torchrun never stops the others."""
    expected = ConfigError | FileNotFoundError | ValueError | RuntimeError
    if isinstance(e, expected) and not os.environ.get("LMFORGE_DEBUG"):
        print(f"lmforge: error on rank {info.rank}: {e}", file=sys.stderr)
    else:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)


def data_parallel_only(info: DistInfo, stage: str, lora: bool) -> None:
    """Fine-tuning stages split the data, not the layers; LoRA keeps the base whole (DDP)."""
    if info.tp > 1:
        raise ConfigError(f"dist.tp splits layers in pretraining only: run {stage} with dist.tp 1")
    if lora and info.sharded:
        raise ConfigError(
            f"{stage} with LoRA trains a small adapter over a frozen base: use dist.strategy ddp"
        )


def ddp_only(info: DistInfo, stage: str) -> None:
    """Stages that train a small whole model (a reward model, a student, a pruned model) split
    the data only: their models have no sharded layout."""
    if info.sharded:
        raise ConfigError(
            f"{stage} splits the data over ranks, not the model: run it with dist.strategy ddp "
            "and dist.tp 1"
        )


def rank_slice(indices: list[int], info: DistInfo) -> tuple[list[int], bool]:
    """This data-parallel rank's share of a global micro-batch, and whether it counts. A rank left
    without examples (a short last batch) runs the first one and weighs it 0, so that it still
    joins every gradient reduction."""
    mine = indices[info.dp_rank :: info.dp_size]
    return (mine, True) if mine else (indices[:1], False)


def total(x: float, info: DistInfo, device: torch.device) -> float:
    """The sum of a number over ranks."""
    if not info.enabled:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's own GPU under torchrun; CPU ranks share the CPU."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


# --------------------------------------------------------------------------- parallelize


def parallelize(model, cfg: DistConfig, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Apply activation checkpointing, tensor parallelism and data parallelism to `model`, in
    that order, and return the module the training loop calls. FSDP2 and tensor parallelism
    change `model` in place (its parameters become DTensors, its names stay), so create the
    optimizer after this; DDP returns a wrapper that shares `model`'s parameters. `model` may
    still be on the meta device (see materialize); `device` is where it trains."""
    if hasattr(model, "activation_checkpointing"):  # a GPT (not a reward model around one)
        model.activation_checkpointing = cfg.activation_checkpointing
    if info.tp > 1:
        tensor_parallel(model, info.mesh["tp"])
    if info.dp_size == 1:
        return model
    if cfg.strategy == "fsdp":
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        cuda = device.type == "cuda"
        kwargs = {"mesh": info.mesh["dp"]}
        if cuda:  # bf16 compute and all-gathers, fp32 master weights and gradient reductions
            kwargs["mp_policy"] = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
        if cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=cuda)
        for block in model.layers:  # one all-gather per block, freed again after its forward
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)  # the rest: embeddings, final norm, output head
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # gradients live in the all-reduce buckets: no second copy of them (4 bytes per parameter)
    ids = [info.local_rank] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True)


@torch.no_grad()
def materialize(model, device: torch.device, tp: int) -> None:
    """Allocate a model built on the meta device and already parallelized (each rank only its
    own slices) and initialise it as GPT(cfg) does in one process: called after the same
    torch.manual_seed, it draws every full tensor on the CPU in the same order, one at a time,
    and each rank keeps its slices. No rank ever holds the whole model."""
    model.to_empty(device=device)
    if model.cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight:
        model.lm_head.weight = model.tok_emb.weight  # to_empty untied plain tensors (not DTensors)
    for name, p in model.named_parameters():
        full = torch.empty(p.shape, dtype=p.dtype)  # a DTensor's shape is the global one
        model.init_weight(name, full)
        index = relayout_index(model.cfg, name, 1, tp)
        assign(p, full if index is None else full[index])
    model.reset_buffers()


@torch.no_grad()
def assign(p: torch.Tensor, full: torch.Tensor) -> None:
    """Set a tensor, or this rank's slices of a DTensor, from its full value (which every rank
    holds alike: each keeps its own slices, nothing is sent)."""
    if isinstance(p, DTensor):
        full = full.to(p.device, p.dtype)
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
    else:
        p.copy_(full)


# Fused projections: wqkv stacks the q, k and v heads, w13 the gate and up columns. Tensor
# parallelism gives each rank a contiguous block of rows, so before splitting, the rows are
# reordered rank by rank: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], each rank then holds whole heads
# of all three. Checkpoints record the tp degree; `relayout_rows` converts between degrees.
_FUSED = re.compile(r"layers\.\d+\.(attn\.wqkv|mlp\.w13)\.(weight|bias)$")


def _row_order(cfg: ModelConfig, which: str, tp: int) -> torch.Tensor:
    """Canonical row index of each row of a fused projection laid out for `tp` ranks."""
    if which == "attn.wqkv":
        H, KV, unit = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        parts = [(0, H), (H, KV), (H + KV, KV)]  # (first head, heads) of q, k and v
    else:
        unit, parts = 1, [(0, cfg.ffn_dim), (cfg.ffn_dim, cfg.ffn_dim)]  # gate, up
    rows = torch.arange(sum(n for _, n in parts) * unit).view(-1, unit)
    order = [
        rows[start + r * (n // tp) : start + (r + 1) * (n // tp)].flatten()
        for r in range(tp)
        for start, n in parts
    ]
    return torch.cat(order)


def relayout_index(cfg: ModelConfig, name: str, from_tp: int, to_tp: int) -> torch.Tensor | None:
    """Rows to take (new = old[index]) to turn parameter `name` laid out for `from_tp` ranks into
    the layout for `to_tp`; None when the parameter has no tp layout or nothing changes."""
    m = _FUSED.search(name)
    if m is None or from_tp == to_tp or (m.group(1) == "mlp.w13" and cfg.mlp != "swiglu"):
        return None
    return torch.argsort(_row_order(cfg, m.group(1), from_tp))[_row_order(cfg, m.group(1), to_tp)]


@torch.no_grad()
def take_rows(t: torch.Tensor, index: torch.Tensor) -> None:
    """t = t[index] in place; for a DTensor through its full value (one tensor at a time)."""
    if isinstance(t, DTensor):
        full = t.full_tensor()
        assign(t, full[index.to(full.device)])
    else:
        t.copy_(t[index.to(t.device)])


def check_tp(cfg: ModelConfig, tp: int) -> None:
    if cfg.mlp == "moe":  # the plan below splits one dense MLP; experts would need their own
        raise ConfigError(
            "dist.tp splits dense MLPs; a mixture of experts (model.mlp moe) trains with dist.tp 1"
        )
    for what, n in (("n_head", cfg.n_head), ("n_kv_head", cfg.n_kv_head), ("ffn_dim", cfg.ffn_dim)):
        if n % tp:
            raise ConfigError(f"dist.tp ({tp}) must divide model.{what} ({n})")


def tensor_parallel(model, mesh) -> None:
    """Split attention by heads and the MLP by hidden columns over the ranks of `mesh` (Megatron:
    the first projection column-wise, the second row-wise, one all-reduce after each). The
    embeddings, norms and output head stay whole on every rank."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    cfg, tp = model.cfg, mesh.size()
    check_tp(cfg, tp)
    for name, p in model.named_parameters():
        index = relayout_index(cfg, name, 1, tp)
        if index is not None:
            take_rows(p.data, index)
    first = "mlp.w13" if cfg.mlp == "swiglu" else "mlp.w1"
    plan = {
        "attn.wqkv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(),
        first: ColwiseParallel(),
        "mlp.w2": RowwiseParallel(),
    }
    for block in model.layers:
        block.attn.n_head //= tp  # each rank's forward sees only its own heads
        block.attn.n_kv_head //= tp
        parallelize_module(block, mesh, plan)


# --------------------------------------------------------------------------- inside the loop


@contextlib.contextmanager
def no_sync(model: torch.nn.Module, skip: bool):
    """Gradient accumulation: all micro-batches but the last skip the gradient reduction."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(not skip)
        yield
    elif skip and hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, also for parameters that may be DTensors on different meshes
    (tensor parallel layers beside whole embeddings, FSDP shards): then each gradient's norm is
    reduced to a plain number over its own mesh first. Returns the total norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return total


def mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of a tensor over ranks (the tensor itself in a single process)."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / info.world_size


def any_rank(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank when it is True on any: all ranks stop at the same step on Ctrl-C."""
    if not info.enabled:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(value, info: DistInfo) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not info.enabled:
        return [value]
    out = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
