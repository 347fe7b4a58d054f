"""Pipeline parallelism for pretraining (`dist.pp`): the GPT's blocks split into consecutive
stages, one per rank of a pipeline, run over micro-batches by PyTorch's own schedules
(torch.distributed.pipelining: GPipe or 1F1B).

The one idea: every rank holds the whole model and an optimizer over all of it, exactly as one
process would, but computes and updates only its own stage; the other stages' copies go stale
until `sync` sends each stage's parameters and optimizer moments from its owner to every rank
(before an evaluation, a checkpoint, the export). After a sync every rank holds one process's
model and optimizer, so checkpoints are the plain single-process layout and resume under any
other layout. With several pipelines (dist.strategy ddp) each stage averages its gradients over
its data-parallel column; the tied embedding (first and last stage) sums its two gradients.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ConfigError, DistConfig
from lmforge.perf import autocast
from lmforge.train.dist import DistInfo


def split_layers(n_layer: int, pp: int) -> list[range]:
    """Consecutive blocks per stage, as even as possible (the first stages take the remainder)."""
    if n_layer < pp:
        raise ConfigError(
            f"dist.pp ({pp}) exceeds model.n_layer ({n_layer}): a stage needs a block"
        )
    sizes = [n_layer // pp + (s < n_layer % pp) for s in range(pp)]
    starts = [sum(sizes[:s]) for s in range(pp)]
    return [range(a, a + n) for a, n in zip(starts, sizes)]


def owner(name: str, parts: list[range]) -> int:
    """The stage that trains parameter `name` (embeddings: the first; norm and head: the last)."""
    if name.startswith("layers."):
        block = int(name.split(".")[1])
        return next(s for s, r in enumerate(parts) if block in r)
    return 0 if name.startswith(("tok_emb.", "pos_emb.")) else len(parts) - 1


class Stage(nn.Module):
    """One stage of a GPT, sharing the model's modules: the embeddings on the first, its blocks,
    the final norm and output head on the last. It maps token ids or hidden states (B, T, dim)
    to hidden states or logits (B, T, V), as GPT.forward's corresponding part does."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        self.tok_emb = model.tok_emb if first else None
        self.pos_emb = model.pos_emb if first else None
        self.layers = nn.ModuleList(model.layers[i] for i in layers)
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.recompute = model.activation_checkpointing
        self.whole = [model]  # the rotary tables (a list: not registered as a submodule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        if self.tok_emb is not None:
            x = self.tok_emb(x)
            if self.pos_emb is not None:
                x = x + self.pos_emb.weight[:T]
        model, cos, sin = self.whole[0], None, None
        if model.pos_emb is None:
            cos, sin = model.rope_cos[:T].unsqueeze(1), model.rope_sin[:T].unsqueeze(1)
        for block in self.layers:
            if self.recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        if self.lm_head is not None:
            x = self.lm_head(self.norm(x))
        return x


class Pipeline:
    """This rank's stage of the model and the schedule that runs it; `step` is one optimizer
    step's forward and backward passes (all ranks call every method together)."""

    def __init__(self, model, cfg: DistConfig, info: DistInfo, device, batch_size, grad_accum):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if getattr(model.cfg, "mlp", None) == "moe":  # the routers' auxiliary losses live in
            # every stage and would have to join the last stage's loss: not done
            raise ConfigError("dist.pp: a mixture-of-experts model is not pipelined yet (its "
                              "auxiliary losses are not carried across stages); use ddp or fsdp")  # fmt: skip
        if batch_size % cfg.pp_microbatches:
            raise ConfigError(
                f"dist.pp_microbatches ({cfg.pp_microbatches}) must divide the batch size per "
                f"rank ({batch_size})"
            )
        self.model, self.info, self.device = model, info, device
        self.pp, self.rank = info.pp, info.pp_rank
        self.parts = split_layers(model.cfg.n_layer, self.pp)
        self.first, self.last = self.rank == 0, self.rank == self.pp - 1
        self.stage = Stage(model, self.parts[self.rank], self.first, self.last)
        self.group = info.mesh.get_group("pp")
        self.dp_group = info.mesh.get_group("dp") if info.dp_size > 1 else None
        self.row = info.dp_rank * self.pp  # global rank of this pipeline's first stage
        self.tied = model.cfg.tie_embeddings and self.pp > 1
        self.names = {id(p): n for n, p in model.named_parameters()}
        # one process's loss is the batch mean over grad_accum micro-batches: each micro-batch's
        # mean counts 1 / (microbatches * grad_accum), and nothing is rescaled afterwards
        scale = 1.0 / (cfg.pp_microbatches * grad_accum)

        def loss_fn(logits, target):
            return F.cross_entropy(logits.float().flatten(0, 1), target.flatten()) * scale

        pstage = PipelineStage(self.stage, self.rank, self.pp, device, group=self.group)
        kind = ScheduleGPipe if cfg.pp_schedule == "gpipe" else Schedule1F1B
        self.schedule = kind(pstage, cfg.pp_microbatches, loss_fn=loss_fn, scale_grads=False)
        self.busy_s = 0.0  # time in this stage's forward and backward passes (bubble measurement)
        self._time_compute(pstage, ("forward_one_chunk", "backward_one_chunk"))
        self._time_compute(self.schedule, ("_maybe_compute_loss",))  # the last stage's loss

    def _time_compute(self, obj, names) -> None:
        """Count the seconds this stage computes (not waiting for its neighbours)."""
        for name in names:
            inner = getattr(obj, name)

            def timed(*args, _inner=inner, **kwargs):
                start = time.perf_counter()
                try:
                    return _inner(*args, **kwargs)
                finally:
                    self.busy_s += time.perf_counter() - start

            setattr(obj, name, timed)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One batch through the pipeline, gradients accumulated into this stage's parameters;
        returns its loss share (the sum of the micro-batch losses) on every stage."""
        losses: list = []
        with autocast(self.device):
            if self.first:
                self.schedule.step(x, target=y if self.last else None, losses=losses)
            elif self.last:
                self.schedule.step(target=y, losses=losses)
            else:
                self.schedule.step()
        loss = (
            torch.stack(losses).sum().detach() if self.last else torch.zeros((), device=self.device)
        )
        tdist.broadcast(loss, self.row + self.pp - 1, group=self.group)
        return loss

    def own_params(self) -> list[nn.Parameter]:
        """This stage's parameters, the tied embedding counted on the first stage only."""
        return [
            p for p in self.model.parameters() if owner(self.names[id(p)], self.parts) == self.rank
        ]

    def reduce_grads(self) -> None:
        """Average gradients over the data-parallel column, then sum the tied embedding's two
        gradients (input rows on the first stage, output head on the last) on both."""
        params = [p for p in self.stage.parameters() if p.grad is not None]
        if self.dp_group is not None:
            for p in params:
                tdist.all_reduce(p.grad, group=self.dp_group)
                p.grad /= self.info.dp_size
        if not self.tied:
            return
        g = self.model.tok_emb.weight.grad
        first, last = self.row, self.row + self.pp - 1
        if self.first:  # the first adds, then sends the sum back: both hold the same bits
            other = torch.empty_like(g)
            tdist.recv(other, last)
            g += other
            tdist.send(g, last)
        elif self.last:
            tdist.send(g, first)
            tdist.recv(g, first)

    def clip(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm over all stages (each stage's squared norm summed),
        as one process's clip_grad_norm_ would; returns the norm before clipping."""
        grads = [p.grad for p in self.own_params() if p.grad is not None]
        sq = sum((g.double().pow(2).sum() for g in grads), torch.zeros((), dtype=torch.float64))
        sq = sq.to(self.device)
        tdist.all_reduce(sq, group=self.group)
        total = sq.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in self.stage.parameters():  # the tied weight on the last stage too
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
        return total

    @torch.no_grad()
    def sync(self, optimizer) -> None:
        """Every stage's parameters and optimizer moments from its owner to every rank of the
        pipeline: afterwards each rank holds one process's model and optimizer."""
        for s in range(self.pp):
            payload = [None]
            if s == self.rank:
                payload = [{self.names[id(p)]: self._pack(p, optimizer) for p in self.own_params()}]
            tdist.broadcast_object_list(payload, src=self.row + s, group=self.group)
            if s == self.rank:
                continue
            params = dict(self.model.named_parameters())
            for name, (value, state) in payload[0].items():
                p = params[name]
                p.copy_(value.to(p.device))
                if state:
                    optimizer.state[p] = {
                        k: v if on_cpu else v.to(p.device) for k, (v, on_cpu) in state.items()
                    }

    @contextlib.contextmanager
    def whole(self, optimizer):
        """One process's model and optimizer on every rank inside (sync), and the other stages'
        optimizer moments dropped again after: between syncs a rank keeps moments (8 bytes a
        parameter) for its own stage only."""
        self.sync(optimizer)
        try:
            yield
        finally:
            self.release(optimizer)

    def release(self, optimizer) -> None:
        """Forget the optimizer moments of parameters this stage does not update."""
        mine = {id(p) for p in self.stage.parameters()}
        for p in [p for p in optimizer.state if id(p) not in mine]:
            del optimizer.state[p]

    @staticmethod
    def _pack(p, optimizer) -> tuple:
        state = optimizer.state.get(p, {})
        moments = {k: (v.detach().cpu().clone(), v.device.type == "cpu") for k, v in state.items()}
        return p.detach().cpu().clone(), moments


def bubble(pp: int, microbatches: int) -> float:
    """The idle fraction of a pipeline of equal stages: (S - 1) / (M + S - 1)."""
    return (pp - 1) / (microbatches + pp - 1)
