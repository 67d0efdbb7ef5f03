"""Distributed training with ``fused=True``: DDP and FSDP2 (``fully_shard``), eager and compiled, with activation
checkpointing. Two processes on the CPU (gloo; the kernels under Triton's interpreter, or on one GPU each where two
are present is left to torchrun: see the README) take halves of one batch; after one SGD step every parameter equals
a single-process step of the eager model on the whole batch (tests/distributed_mae.py is the job)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_mae as job
from hiera_fast import ops

WORLD = 2

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed + gloo"),
    pytest.mark.skipif(ops.fused_backend("cpu")[0] == "eager", reason="needs the kernels under Triton's interpreter"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run the 2-process job once for all variants: ``{variant: {"loss", "params", "launches"}}``."""
    out = tmp_path_factory.mktemp("distributed")
    mp.spawn(job.spawned, args=(WORLD, str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return {v: torch.load(out / f"{v}.pt") for v in job.VARIANTS}


@pytest.fixture(scope="module")
def reference() -> tuple[float, dict, dict]:
    """(loss, gradients, parameters after the step) of the eager model (fused=False) in one process, whole batch."""
    return job.single_process_step(WORLD)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("variant", job.VARIANTS)
def test_step_equals_single_process(results, reference, variant):
    ref_loss, ref_grads, ref_after = reference
    got = results[variant]
    layers = sum(len(stage.layers) for stage in job.build_model().hiera.encoder.stages)
    attention = layers + job.config().decoder_depth
    # each process: every block forward, the checkpointed encoder layers again in the backward, every block backward
    assert got["launches"].get("mask_unit_attention_fwd") == attention + layers, got["launches"]
    assert got["launches"].get("mask_unit_attention_bwd") == attention, got["launches"]
    assert abs(got["loss"] - ref_loss) <= 1e-5 * abs(ref_loss)
    assert got["grads"].keys() == ref_grads.keys() == got["params"].keys() == ref_after.keys()
    for name, g in got["grads"].items():  # reduced over the processes: a wrong scale or a missed bucket shows
        assert _rel(g, ref_grads[name]) <= 1e-5, f"{variant}: gradient of {name}: {_rel(g, ref_grads[name]):.1e}"
        assert _rel(got["params"][name], ref_after[name]) <= 1e-6, f"{variant}: {name} after the step"
