"""``torch.export`` of fused models (no wrapper: the output classes are pytrees) and what the exported graph holds."""

from __future__ import annotations

import pytest
import torch

import hiera_fast as H
from hiera_fast import ops
from helpers import randomize_, tiny_image_config

pytestmark = pytest.mark.skipif(ops.fused_backend("cuda" if torch.cuda.is_available() else "cpu")[0] == "eager",
                                reason="needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it)")


def _targets(ep) -> set[str]:
    return {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("cls", [H.HieraModel, H.HieraForImageClassification, H.HieraBackbone])
def test_export_a_fused_model(cls, device):
    """``torch.export.export`` of a fused model as it is: its graph holds our ops (the forward kernel and, where the
    model pools, the max-pool), and running the exported program equals the model."""
    config = tiny_image_config(out_features=["stage1", "stage4"]) if cls is H.HieraBackbone else tiny_image_config()
    model = randomize_(cls(config, fused=True), std=0.1).to(device).eval()
    x = torch.randn(2, 3, 64, 64, device=device)
    ep = torch.export.export(model, (x,))
    targets = _targets(ep)
    assert "hiera_fast.mask_unit_attention_fwd.default" in targets, targets
    assert "hiera_fast.unrolled_max_pool_fwd.default" in targets, targets
    with torch.no_grad():
        ref, got = model(x), ep.module()(x)
    ref_leaves, got_leaves = torch.utils._pytree.tree_leaves(ref), torch.utils._pytree.tree_leaves(got)
    assert len(ref_leaves) == len(got_leaves) > 0
    for a, b in zip(got_leaves, ref_leaves, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_exported_output_keeps_its_class(device):
    model = randomize_(H.HieraForImageClassification(tiny_image_config(), fused=True), std=0.1).to(device).eval()
    x = torch.randn(1, 3, 64, 64, device=device)
    out = torch.export.export(model, (x,)).module()(x)
    assert type(out) is H.outputs.HieraForImageClassificationOutput and out.logits.shape == (1, 7)
