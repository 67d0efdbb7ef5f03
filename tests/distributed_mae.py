"""One MAE training step of ``HieraForPreTraining(fused=True)`` on several processes: the worker of
``tests/test_distributed.py`` (CPU, gloo, the kernels under Triton's interpreter), also runnable by hand::

    torchrun --nproc_per_node 2 tests/distributed_mae.py OUT_DIR

Each process takes its slice of one global batch (images and MAE noise fixed, so every run masks the same units) and
runs one SGD step of every variant: DDP and FSDP2 (``fully_shard`` per layer and on the root), each eager and under
``torch.compile`` (aot_eager on a CPU), all with activation checkpointing; rank 0 saves the loss, the full gradients
(reduced over the processes) and the full parameters after the step. :func:`single_process_step` is the reference:
the same step of the eager model on the whole batch.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import hiera_fast as H

VARIANTS = ("ddp", "ddp+compile", "fsdp2", "fsdp2+compile")
PER_RANK = 1  # images per process
LR = 0.5


def config() -> H.HieraConfig:
    return H.HieraConfig(image_size=(64, 64), embed_dim=16, num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                         num_query_pool=2, decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2,
                         mask_ratio=0.5)


def build_model(fused: bool = True) -> H.HieraForPreTraining:
    """Seeded random weights (biases and norms too), peaked attention, layers checkpointed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = H.HieraForPreTraining(config(), fused=fused)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 1.5 * p.shape[-1] ** -0.5 if name.endswith("qkv.weight") else 0.1)
    model.gradient_checkpointing_enable()
    return model.train()


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[world * PER_RANK, 3, 64, 64]`` and MAE noise ``[world * PER_RANK, 4]`` (4 mask units)."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(world * PER_RANK, 3, 64, 64, generator=gen), torch.rand(world * PER_RANK, 4, generator=gen)


def _full(p: torch.Tensor) -> torch.Tensor:
    """A parameter or gradient as one plain tensor (FSDP2 shards them as DTensors)."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()


def sgd_step(model: torch.nn.Module, x: torch.Tensor, noise: torch.Tensor) -> tuple[float, dict, dict]:
    """One SGD step: (loss, gradients before the update, parameters after it), keyed by the model's own names."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = model(x, noise=noise).loss
    loss.backward()
    grads = {_name(n): _full(p.grad) for n, p in model.named_parameters()}
    opt.step()
    return loss.item(), grads, {_name(n): _full(p) for n, p in model.named_parameters()}


def _name(name: str) -> str:
    """The unwrapped model's parameter name (compile adds ``_orig_mod.``, DDP ``module.``)."""
    return name.replace("_orig_mod.", "").replace("module.", "")


def single_process_step(world: int) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The reference: one step of the eager model (``fused=False``) on the whole batch in this process; (loss,
    gradients, parameters after the step)."""
    return sgd_step(build_model(fused=False), *global_batch(world))


def _wrap(variant: str, model: torch.nn.Module) -> torch.nn.Module:
    if variant.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for stage in model.hiera.encoder.stages:
            for layer in stage.layers:
                fully_shard(layer)
        wrapped = fully_shard(model)
    return torch.compile(wrapped, backend="aot_eager") if variant.endswith("+compile") else wrapped


def run(out_dir: str) -> None:
    """One process of the job: ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` or a store set up by the caller."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x, noise = global_batch(world)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for variant in VARIANTS:
        torch._dynamo.reset()
        model = _wrap(variant, build_model())
        from hiera_fast import ops

        before = ops.kernel_launches.copy()
        loss, grads, params = sgd_step(model, x[mine], noise[mine])
        launched = ops.kernel_launches - before
        loss = torch.tensor(loss)
        dist.all_reduce(loss)  # the mean of the ranks' losses is the global batch's (equal slices)
        if rank == 0:
            torch.save({"loss": loss.item() / world, "grads": grads, "params": params, "launches": dict(launched)},
                       os.path.join(out_dir, f"{variant}.pt"))
        dist.barrier()


def spawned(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` entry: a gloo group over a file store."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run(out_dir)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        run(sys.argv[1])
    finally:
        dist.destroy_process_group()
