"""FFN experts as one grouped GEMM per projection.

Shape letters: T tokens, S slots per token, P valid (token, slot) pairs, E experts in the
bank, d model width, H expert hidden width.

Gated (SwiGLU/GeGLU):
    E_i(x) = W_down_i (act(W_gate_i x + b_gate_i) * (W_up_i x + b_up_i)) + b_down_i
    (GPT-OSS's clamped SwiGLU replaces ``act(g) * u``: see :func:`clamped_swiglu`)
Plain:
    E_i(x) = W_out_i act(W_in_i x + b_in_i) + b_out_i

The routing weight ``w`` scales the output, ``w E_i(x)``, or with ``weight_input`` the input,
``E_i(w x)`` (Llama 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.config import FFNExperts, PoolSpec
from raymoe.kernels.activations import activation
from raymoe.kernels.bank import ExpertBank, register_bank
from raymoe.kernels.grouping import Grouped, group_by_expert


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float):
    """GPT-OSS: ``(clamp(up, ±limit) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, limit)``."""
    g = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (g * torch.sigmoid(alpha * g))


def grouped_linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, g: Grouped
) -> torch.Tensor:
    """``x``: [P, in] sorted by expert, ``w``: [E, out, in], ``b``: [E, out] -> [P, out]."""
    if _grouped_mm_ok(x):
        y = F.grouped_mm(x, w.transpose(1, 2), offs=g.offsets)
    else:  # NOTE: dtypes grouped_mm lacks on this device; a short loop, same math.
        y = (
            torch.cat([xs @ w[e].T for e, xs in _segments(x, g)])
            if x.shape[0]
            else x.new_zeros((0, w.shape[1]))
        )
    if b is not None:
        y = y + b[g.expert]
    return y


# NOTE: fp32 only on CPU: bf16/fp16 there demand 16-byte-aligned strides, fp64 is unsupported.
_GROUPED_MM_DTYPES = {"cpu": {torch.float32}, "cuda": {torch.bfloat16}}


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return hasattr(F, "grouped_mm") and x.dtype in _GROUPED_MM_DTYPES.get(x.device.type, ())


def _segments(x: torch.Tensor, g: Grouped):
    start = 0
    for e, n in enumerate(g.counts.tolist()):
        if n:
            yield e, x[start : start + n]
        start += n


@register_bank
class FFNBank(ExpertBank):
    kind = "ffn"

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        hidden: int,
        *,
        gated: bool = True,
        act: str = "silu",
        bias: bool = False,
        clamp: tuple[float, float] | None = None,
        weight_input: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        """``clamp``: (alpha, limit) of GPT-OSS's clamped SwiGLU (gated only)."""
        super().__init__(num_experts, d_model)
        self.hidden = hidden
        self.gated = gated
        self.act_name = act
        self.act = activation(act)
        self.clamp = clamp
        self.weight_input = weight_input
        E, H, d = num_experts, hidden, d_model
        names_in = ("w_gate", "w_up") if gated else ("w_in",)
        name_out = "w_down" if gated else "w_out"
        kw = {"dtype": dtype, "device": device}
        for name in names_in:
            self.register_parameter(name, nn.Parameter(torch.zeros(E, H, d, **kw)))
            if bias:
                bname = "b_" + name.removeprefix("w_")
                self.register_parameter(bname, nn.Parameter(torch.zeros(E, H, **kw)))
        self.register_parameter(name_out, nn.Parameter(torch.zeros(E, d, H, **kw)))
        if bias:
            bname = "b_" + name_out.removeprefix("w_")
            self.register_parameter(bname, nn.Parameter(torch.zeros(E, d, **kw)))

    @classmethod
    def from_spec(
        cls,
        spec: PoolSpec,
        expert_ids: torch.Tensor,
        *,
        device: torch.device | str = "cpu",
        seeded: bool = True,
    ) -> FFNBank:
        ex = spec.experts
        assert isinstance(ex, FFNExperts)
        bank = cls(
            len(expert_ids),
            spec.d_model,
            ex.hidden,
            gated=ex.gated,
            act=ex.activation,
            bias=ex.bias,
            clamp=(ex.clamped_swiglu.alpha, ex.clamped_swiglu.limit) if ex.clamped_swiglu else None,
            weight_input=ex.weight_input,
            dtype=spec.torch_dtype,
            device=device,
        )
        inner = ("w_gate", "w_up", "w_in", "b_gate", "b_up", "b_in")  # fan-in d; the rest H
        scales = {
            name: 1.0 / math.sqrt(spec.d_model if name in inner else ex.hidden)
            for name, _ in bank.named_parameters()
        }
        if seeded:  # else zeros: the caller imports every row
            bank.seed_rows(spec, expert_ids, scales)
        return bank

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        g = group_by_expert(ids, weights, self.num_experts)
        w = g.weight.to(x.dtype).unsqueeze(1)  # [P, 1]
        xs = x[g.token]  # [P, d]
        if self.weight_input:
            xs = xs * w
        if self.gated:
            gate = grouped_linear(xs, self.w_gate, getattr(self, "b_gate", None), g)
            up = grouped_linear(xs, self.w_up, getattr(self, "b_up", None), g)
            h = self.act(gate) * up if self.clamp is None else clamped_swiglu(gate, up, *self.clamp)
            ys = grouped_linear(h, self.w_down, getattr(self, "b_down", None), g)
        else:
            h = self.act(grouped_linear(xs, self.w_in, getattr(self, "b_in", None), g))
            ys = grouped_linear(h, self.w_out, getattr(self, "b_out", None), g)
        if not self.weight_input:
            ys = ys * w
        return torch.zeros_like(x).index_add_(0, g.token, ys)
