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

import itertools
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


# NOTE: fp32 only on CPU: bf16/fp16 there demand 16-byte-aligned strides, fp64 is unsupported.
_GROUPED_MM_DTYPES = {"cpu": {torch.float32}, "cuda": {torch.bfloat16}}


def _grouped_mm_ok(x: torch.Tensor) -> bool:
    return hasattr(F, "grouped_mm") and x.dtype in _GROUPED_MM_DTYPES.get(x.device.type, ())


class _Segments:
    """Pairs sorted by expert; rows stay ``[P, ...]``. Each projection is one ``grouped_mm``,
    or a loop over the experts that have pairs where few do on CPU (there ``grouped_mm`` runs
    one ``mm`` per expert of the bank, empty or not: 8 experts, 2 touched, T=1: 78 vs 34 us)
    or where this device lacks ``grouped_mm`` for the dtype."""

    def __init__(self, g: Grouped):
        self.g = g
        self._spans: list[tuple[int, int, int]] | None = None

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        """(expert, start, count) of every expert that has pairs (read once, when needed)."""
        if self._spans is None:
            counts = self.g.counts.tolist()
            starts = [0, *itertools.accumulate(counts)]
            self._spans = [(e, starts[e], n) for e, n in enumerate(counts) if n]
        return self._spans

    @property
    def sparse(self) -> bool:
        """Whether at most half the bank's experts have pairs."""
        return 2 * len(self.spans) <= len(self.g.counts)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``x``: [P, in] sorted by expert, ``w``: [E, out, in], ``b``: [E, out] -> [P, out]."""
        if x.shape[0] == 0:
            return x.new_zeros((0, w.shape[1]))
        if _grouped_mm_ok(x) and not (x.device.type == "cpu" and self.sparse):
            y = F.grouped_mm(x, w.transpose(1, 2), offs=self.g.offsets)
        else:
            y = torch.cat([x[s : s + n] @ w[e].T for e, s, n in self.spans])
        return y if b is None else y + b[self.g.expert]


class _Padded:
    """Every expert's pairs in one row of a zero-padded ``[E, M, ...]`` block (M = the most
    pairs of any expert), fed to one ``bmm`` per projection.

    At small batches this wins over ``grouped_mm`` although it computes the padding: ``bmm``
    spreads the experts over the intra-op threads, ``grouped_mm`` runs them one after another
    with a few rows each (8 experts x 16 rows, d=256, H=512, 2 threads: 127 vs 74 GFLOP/s).
    Padding rows never reach the output, so their values (``act(b)`` with biases) are moot.
    """

    def __init__(self, g: Grouped, rows: int):
        self.g = g
        self.rows = rows
        self.rank = torch.arange(len(g.expert), device=g.expert.device) - (
            g.offsets.to(torch.int64) - g.counts
        ).index_select(0, g.expert)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((len(self.g.counts), self.rows, x.shape[1]))
        out[self.g.expert, self.rank] = x
        return out

    def unpack(self, y: torch.Tensor) -> torch.Tensor:
        return y[self.g.expert, self.rank]

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``x``: [E, M, in], ``w``: [E, out, in], ``b``: [E, out] -> [E, M, out]."""
        y = torch.bmm(x, w.transpose(1, 2))
        return y if b is None else y + b.unsqueeze(1)


# Pad when the padded block has at most PAD_RATIO rows per valid pair and at most PAD_ROWS
# rows per expert: past that, each expert's mm is big enough to use the threads itself and
# the padding copies cost more than they win (8k tokens: 126 vs 104 ms).
PAD_RATIO = 2.0
PAD_ROWS = 128


def _layout(g: Grouped) -> _Segments | _Padded:
    pairs = len(g.expert)
    # NOTE: measured on CPU only; on GPU grouped_mm is one kernel, and reading the counts
    # here would wait for the device
    if pairs and g.expert.device.type == "cpu":
        rows = int(g.counts.max())
        if rows <= PAD_ROWS and len(g.counts) * rows <= PAD_RATIO * pairs:
            return _Padded(g, rows)
    return _Segments(g)


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
        lay = _layout(g)
        xs = lay.pack(xs)
        if self.gated:
            gate = lay.linear(xs, self.w_gate, getattr(self, "b_gate", None))
            up = lay.linear(xs, self.w_up, getattr(self, "b_up", None))
            h = self.act(gate) * up if self.clamp is None else clamped_swiglu(gate, up, *self.clamp)
            ys = lay.linear(h, self.w_down, getattr(self, "b_down", None))
        else:
            h = self.act(lay.linear(xs, self.w_in, getattr(self, "b_in", None)))
            ys = lay.linear(h, self.w_out, getattr(self, "b_out", None))
        ys = lay.unpack(ys)
        if not self.weight_input:
            ys = ys * w
        return torch.zeros_like(x).index_add_(0, g.token, ys)
