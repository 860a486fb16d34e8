"""Transforms of a built `Transformer` for training: activation checkpointing, compile, FSDP2.

torchtitan's 2025 `parallelize_llama.py` split: `apply_ac`, `apply_compile`, `apply_fsdp`, each
wrapping the blocks of a model that knows nothing about them, applied in that order. Plus the
few `torch.distributed` helpers the training loop needs; one process (no torchrun) is world size 1.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import LlamaforgeError

AC_MODES = ("none", "selective", "full")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> Dist:
    """World size 1 without torchrun; with torchrun, NCCL on GPUs or gloo on CPUs and a 1-D device mesh."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist(device=torch.device(device))
    from torch.distributed.device_mesh import init_device_mesh
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
    mesh = init_device_mesh(kind, (world,))
    return Dist(rank, world, local, torch.device(kind, local) if kind == "cuda" else torch.device("cpu"), mesh)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)  # gloo has no AVG
    return x


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


# Ops whose outputs selective checkpointing keeps (torchtitan `_save_list`): the matrix products and
# attention, expensive to recompute; norms, rope, SwiGLU's elementwise ops are recomputed. This is
# the LLaMA paper's choice (section 2.4: "we save the activations that are expensive to compute,
# such as the outputs of linear layers").
def _save_list():
    aten = torch.ops.aten
    ops = [aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_flash_attention_for_cpu.default]
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention"):
        if hasattr(aten, name):
            ops.append(getattr(aten, name).default)
    return set(ops)


def _selective_policy(save, ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: nn.Module, mode: str) -> None:
    """Wrap each block in activation checkpointing: 'full' recomputes the block in backward,
    'selective' keeps matmul and attention outputs and recomputes the rest. State-dict names are unchanged."""
    if mode not in AC_MODES:
        raise LlamaforgeError(f"unknown activation checkpointing mode {mode!r}; choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    kw = {}
    if mode == "selective":
        policy = functools.partial(_selective_policy, _save_list())
        kw["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kw)  # no dropout: no RNG to replay


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block separately (torchtitan): small graphs, compiled once, reused by every layer."""
    for block in model.layers:
        block.compile(fullgraph=True)


def apply_fsdp(model: nn.Module, d: Dist) -> None:
    """FSDP2: shard each block, then the root (embedding, final norm, output), over the 1-D mesh.

    Parameters, gradients and optimizer state live sharded in fp32; bf16 comes from autocast.
    """
    from torch.distributed.fsdp import fully_shard
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=d.mesh, reshard_after_forward=i < len(model.layers) - 1)
    fully_shard(model, mesh=d.mesh)
