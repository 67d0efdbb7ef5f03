"""Hiera MAE pretraining with ``fused=True`` on one or more GPUs (DDP or FSDP2), a minimal loop.

    torchrun --standalone --nproc_per_node 8 examples/pretrain_mae.py --model mae_hiera_base_224 --batch 128 \\
        --parallel ddp --compile

``--batch`` is per GPU. Images are random unless ``--data`` names an ImageFolder directory (needs torchvision).
``--parallel fsdp2`` shards parameters, gradients and optimizer state with ``torch.distributed.fsdp.fully_shard``
(per encoder layer, then the whole model); ``--compile`` runs ``torch.compile`` (default mode with FSDP2, CUDA graphs
with ``mode="reduce-overhead"`` with DDP); ``--checkpointing`` recomputes each encoder layer in the backward. Without
CUDA (for a try on a CPU: ``--device cpu``, gloo) the fused kernels run only under Triton's interpreter.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import hiera_fast as H


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mae_hiera_base_224", help="an mae_ preset")
    p.add_argument("--batch", type=int, default=128, help="images per process")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the encoder layers")
    p.add_argument("--data", default=None, help="an ImageFolder directory (default: random images)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--image-size", type=int, default=None, help="train at another square size (e.g. 64 for a quick "
                                                                   "try on a CPU)")
    return p.parse_args()


def batches(args, config: H.HieraConfig, device: torch.device, rank: int, world: int):
    """Endless ``[batch, 3, H, W]`` batches: this process's share of an ImageFolder, or random images."""
    if args.data is None:
        gen = torch.Generator(device).manual_seed(rank)
        while True:
            yield torch.randn(args.batch, 3, *config.image_size, device=device, generator=gen)
    import torchvision.transforms.v2 as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(config.image_size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
                    T.ToImage(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = ImageFolder(args.data, transform=tf)
    sampler = torch.utils.data.DistributedSampler(data, world, rank, drop_last=True)
    loader = torch.utils.data.DataLoader(data, args.batch, sampler=sampler, num_workers=8, pin_memory=True,
                                         drop_last=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for images, _ in loader:
            yield images.to(device, non_blocking=True)
        epoch += 1


def main() -> None:
    args = parse()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial weights on every process (DDP also broadcasts rank 0's)
    sizes = {} if args.image_size is None else {"image_size": (args.image_size, args.image_size)}
    config = H.HieraConfig.from_preset(args.model, **sizes)
    model = H.HieraForPreTraining(config, fused=True).to(device).train()
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    if args.parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    else:
        from torch.distributed.fsdp import fully_shard

        for stage in model.hiera.encoder.stages:
            for layer in stage.layers:
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, fused=cuda)
    graphs = args.compile and cuda and args.parallel == "ddp"
    step_model = torch.compile(model, mode="reduce-overhead" if graphs else None) if args.compile else model
    data = batches(args, config, device, rank, world)
    start = time.perf_counter()
    for step in range(args.steps):
        images = next(data)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = step_model(images).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG if cuda else dist.ReduceOp.SUM)
            if rank == 0:
                mean = loss.item() if cuda else loss.item() / world
                rate = (step + 1) * args.batch * world / (time.perf_counter() - start)
                print(f"step {step}: loss {mean:.4f}, {rate:,.1f} images/s", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
