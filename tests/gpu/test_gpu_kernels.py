"""GPU kernels against the CPU reference (fp32, 1e-5). Skipped without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from raymoe import MoELayer
from tests.helpers import spec_dict

pytestmark = pytest.mark.gpu

CASES = {
    "mixtral": spec_dict({"kind": "topk", "k": 2, "renormalize": True}, E=8, d=64, H=128),
    "deepseek": spec_dict(
        {
            "kind": "topk",
            "k": 4,
            "score": "sigmoid",
            "renormalize": True,
            "n_groups": 4,
            "topk_groups": 2,
            "correction_bias": True,
        },
        E=16,
        d=64,
        H=96,
        shared={"hidden": 64},
    ),
    "peer": spec_dict(
        {"kind": "product_key", "heads": 4, "k": 8, "d_key": 32}, E=4096, d=64, kind="peer"
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_layer_equals_cpu_layer(name):
    cpu = MoELayer(CASES[name]).eval()
    gpu = MoELayer(CASES[name], device="cuda").eval()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(257, 64)
    with torch.no_grad():
        want, info_c = cpu(x, return_info=True)
        got, info_g = gpu(x.cuda(), return_info=True)
    assert torch.equal(info_c.expert_ids, info_g.expert_ids.cpu())
    assert (got.cpu() - want).abs().max().item() <= 1e-5
