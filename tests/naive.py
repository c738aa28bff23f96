"""Naive per-token reference implementations (loops on purpose), used by the tests only.

Tie rule everywhere: higher score first, then lower index (raymoe's canonical top-k).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACT = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def topk_list(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def ffn_expert(
    sd: dict, e: int, x: torch.Tensor, gated: bool, act: str, clamp: dict | None = None
) -> torch.Tensor:
    """One expert on one token, from a neutral-name state dict; ``clamp``: GPT-OSS's
    clamped SwiGLU ({"alpha", "limit"}), written out element by element."""

    def lin(name: str) -> torch.Tensor:
        b = sd.get(f"experts.b_{name}")
        return sd[f"experts.w_{name}"][e] @ h_in[name] + (b[e] if b is not None else 0)

    a = ACT[act]
    if gated:
        h_in = {"gate": x, "up": x}
        if clamp:  # per element, autograd kept
            alpha, limit = clamp["alpha"], clamp["limit"]
            cells = []
            for g, u in zip(lin("gate"), lin("up"), strict=True):
                g = g if g < limit else g * 0 + limit
                u = u if -limit <= u <= limit else u * 0 + math.copysign(limit, u.item())
                cells.append((u + 1) * g / (1 + torch.exp(-alpha * g)))
            h = torch.stack(cells)
        else:
            h = a(lin("gate")) * lin("up")
        h_in["down"] = h
        return lin("down")
    h_in = {"in": x}
    h_in["out"] = a(lin("in"))
    return lin("out")


def peer_expert(sd: dict, e: int, x: torch.Tensor, act: str) -> torch.Tensor:
    return sd["experts.v"][e] * ACT[act](sd["experts.u"][e] @ x)


def combine(
    expert_fn, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, weight_input: bool = False
) -> torch.Tensor:
    """y[t] = sum over valid slots of w[t, s] * expert(ids[t, s], x[t]), or with
    ``weight_input`` of expert(ids[t, s], w[t, s] * x[t])."""
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for s in range(ids.shape[1]):
            e = int(ids[t, s])
            if e >= 0 and weight_input:
                y[t] += expert_fn(e, w[t, s] * x[t])
            elif e >= 0:
                y[t] += w[t, s] * expert_fn(e, x[t])
    return y


def topk_routes(sd: dict, x: torch.Tensor, r: dict) -> tuple[list[list[int]], list[list[float]]]:
    """Per-token top-k gating with every option of the ``topk`` routing kind."""
    W = sd["router.weight"]
    E = W.shape[0]
    ids_all, w_all = [], []
    for t in range(x.shape[0]):
        logits = W @ x[t] + (sd.get("router.bias", 0))
        if r.get("score", "softmax") == "softmax":
            scores = torch.softmax(logits, -1)
        else:
            scores = torch.sigmoid(logits)
        choice = scores + (sd.get("router.correction_bias", 0))
        choice = choice.tolist()
        candidates = list(range(E))
        if r.get("n_groups"):
            G = r["n_groups"]
            m = E // G
            gscores = []
            for g in range(G):
                members = sorted(choice[g * m : (g + 1) * m], reverse=True)
                gscores.append(members[0] if r.get("group_score") == "max" else sum(members[:2]))
            keep = topk_list(gscores, r["topk_groups"])
            candidates = [e for e in range(E) if e // m in keep]
        cand_scores = [choice[e] if e in candidates else -math.inf for e in range(E)]
        ids = topk_list(cand_scores, r["k"])
        w = [float(scores[e]) for e in ids]
        if r.get("renormalize"):
            total = sum(w)
            w = [v / total for v in w]
        w = [v * r.get("scaling", 1.0) for v in w]
        ids_all.append(ids)
        w_all.append(w)
    return ids_all, w_all


def switch_routes(sd, x, E, capacity, seq_len=None):
    """Top-1; tokens of each (group, expert) beyond ``capacity`` in arrival order dropped."""
    W = sd["router.weight"]
    seen: dict[tuple[int, int], int] = {}
    ids, ws = [], []
    for t in range(x.shape[0]):
        p = torch.softmax(W @ x[t], -1)
        e = topk_list(p.tolist(), 1)[0]
        key = (t // seq_len if seq_len else 0, e)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= capacity:
            ids.append([e])
            ws.append([float(p[e])])
        else:
            ids.append([-1])
            ws.append([0.0])
    return ids, ws


def expert_choice_routes(sd, x, E, capacity):
    """Each expert picks its ``capacity`` highest-probability tokens."""
    W = sd["router.weight"]
    T = x.shape[0]
    probs = [torch.softmax(W @ x[t], -1) for t in range(T)]
    picked: list[list[int]] = [[] for _ in range(T)]
    for e in range(E):
        col = [float(probs[t][e]) for t in range(T)]
        for t in topk_list(col, capacity):
            picked[t].append(e)
    return [sorted(p) for p in picked], [
        [float(probs[t][e]) for e in sorted(picked[t])] for t in range(T)
    ]


def product_key_routes(sd, x, heads, k, d_key, n, shift=0.0, rows=None, cols=None):
    """Brute force: score every one of the rows*cols (default n*n) experts, per head
    (q = W x + shift)."""
    rows, cols = rows or n, cols or n
    q_all = x @ sd["router.query.weight"].T + shift
    keys = sd["router.keys"]  # [h, 2, n, c]
    c = d_key // 2
    ids, ws = [], []
    for t in range(x.shape[0]):
        row_ids, row_w = [], []
        for h in range(heads):
            q = q_all[t, h * d_key : (h + 1) * d_key]
            s1 = keys[h, 0, :rows] @ q[:c]
            s2 = keys[h, 1, :cols] @ q[c:]
            full = (s1[:, None] + s2[None, :]).reshape(-1).tolist()
            top = topk_list(full, k)
            vals = torch.tensor([full[i] for i in top])
            row_ids += top
            row_w += torch.softmax(vals, -1).tolist()
        ids.append(row_ids)
        ws.append(row_w)
    return ids, ws


def hierarchical_routes(sd, x, E, G, kg, k):
    m = E // G
    ids, ws = [], []
    for t in range(x.shape[0]):
        pg = torch.softmax(sd["router.group.weight"] @ x[t], -1).tolist()
        logits = sd["router.weight"] @ x[t]
        row_ids, row_w = [], []
        for g in topk_list(pg, kg):
            pe = torch.softmax(logits[g * m : (g + 1) * m], -1).tolist()
            for j in topk_list(pe, k):
                row_ids.append(g * m + j)
                row_w.append(pg[g] * pe[j])
        ids.append(row_ids)
        ws.append(row_w)
    return ids, ws


def shared_expert(sd, x, act="silu"):
    a = ACT[act]
    rows = [a(sd["shared.w_gate"] @ xt) * (sd["shared.w_up"] @ xt) for xt in x]
    out = torch.stack([sd["shared.w_down"] @ h for h in rows])
    if "shared_gate.weight" in sd:
        out = out * torch.sigmoid(x @ sd["shared_gate.weight"].T)
    return out


def soft_moe(sd: dict, x: torch.Tensor, expert_fn, per_expert: int) -> torch.Tensor:
    """Soft MoE, one sequence and one slot at a time: ``x`` [B, L, d] -> [B, L, d]."""
    phi = sd["router.weight"]  # [n, d]
    n = phi.shape[0]
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        seq = x[b]
        logits = [[float(phi[s] @ seq[t]) for s in range(n)] for t in range(len(seq))]
        outputs = []
        for s in range(n):  # dispatch: a softmax over the sequence's tokens
            col = [math.exp(row[s]) for row in logits]
            slot = sum(col[t] / sum(col) * seq[t] for t in range(len(seq)))
            outputs.append(expert_fn(s // per_expert, slot))
        for t, row in enumerate(logits):  # combine: a softmax over the slots
            z = sum(math.exp(v) for v in row)
            out[b, t] = sum(math.exp(row[s]) / z * outputs[s] for s in range(n))
    return out
