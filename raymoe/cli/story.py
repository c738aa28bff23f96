"""The demo's story: a tiny MoE model served from the checkpoint it writes, generating the
same tokens through the pool as in process; then the traffic shifts to a hot set and the
pool reacts (an automatic rebalance, a hot expert pinned to more replicas, experts added and
removed, a shard killed) while clients keep sending requests, each checked against the
in-process :class:`~raymoe.MoEStack`, none failing."""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray
import torch

import raymoe
from raymoe import MoEStack, hf
from raymoe.hf.tiny import greedy, prompts, tiny_model

FAMILY, LAYERS, EXPERTS, SHARDS = "qwen3_moe", 4, 16, 4
CONTROL = {
    "auto_rebalance": True,
    "rebalance_interval_s": 4.0,
    "load_half_life_s": 2.0,
    "extra_replicas": 0.5,
}


@dataclass
class Row:
    step: str
    version: int
    imbalance: float  # the worst layer's, over the last seconds
    requests: int
    failed: int
    max_error: float


class Clients:
    """Threads sending hidden states to random layers, each answer checked against the
    references of the pool's states from when the request started to when it ended (a
    change may apply meanwhile). The inputs of a layer favour its hot experts once
    :meth:`shift` ran."""

    def __init__(self, pool, reference: MoEStack, clients: int = 4, tokens: int = 32):
        self.pool, self.refs = pool, [reference]
        self.layers = reference.spec.num_layers
        self.tokens, self.clients = tokens, clients
        self.xs = [self._inputs(None) for _ in range(clients)]
        self.errors: list[float] = []
        self.failures: list[BaseException] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _inputs(self, hot: dict | None, seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        out = []
        for layer in range(self.layers):
            x = torch.randn(self.tokens, self.refs[0].spec.d_model, generator=g)
            if hot is not None:  # lean towards the hot experts' gate rows
                w = self.refs[0].layers[layer].router.weight.detach()[hot[layer]]
                x = x + 2.5 * (w / w.norm(dim=1, keepdim=True)).sum(0)
            out.append(x)
        return out

    def shift(self, hot: dict) -> None:
        """From now on, layer ``l``'s inputs favour experts ``hot[l]``."""
        self.xs = [self._inputs(hot, seed=i + 1) for i in range(self.clients)]

    @contextlib.contextmanager
    def change(self, reference: MoEStack):
        """The change run inside makes ``reference`` the pool's function."""
        self.refs.append(reference)
        yield
        self.refs = self.refs[-1:]

    def _run(self, i: int) -> None:
        rng = np.random.default_rng(i)
        while not self.stop.is_set():
            layer = int(rng.integers(self.layers))
            x, before = self.xs[i][layer], list(self.refs)
            try:
                y = self.pool.forward(x, layer=layer)
                refs = before + [r for r in self.refs if r not in before]  # and since
                with torch.no_grad():
                    self.errors.append(
                        min((y - r(x, layer=layer)).abs().max().item() for r in refs)
                    )
            except Exception as e:  # counted: the demo shows there are none
                self.failures.append(e)

    def __enter__(self) -> Clients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)


def run_story(say=print) -> list[Row]:
    with tempfile.TemporaryDirectory() as d:
        say(f"[model] writing a tiny {FAMILY} checkpoint: {LAYERS} MoE layers x {EXPERTS} experts")
        tiny_model(FAMILY, layers=LAYERS, experts=EXPERTS).save_pretrained(d)
        spec, weights = hf.from_pretrained(
            d, name="demo-model", shards={"count": SHARDS, "routers": 2}, control=CONTROL
        )
        model = hf.load_model(d)
    say(f"[model] serving its experts on {SHARDS} shards (one pool, {LAYERS} layers)")
    pool = raymoe.serve(spec, weights=weights)
    try:
        reference = MoEStack(spec).eval()
        reference.load_state_dict(weights)
        _generate(pool, model, say)
        return _elastic(pool, spec, reference, say)
    finally:
        pool.shutdown()


def _generate(pool, model, say) -> None:
    inputs = prompts()
    want = greedy(model, inputs, new_tokens=24)
    hf.attach(model, pool)
    got = greedy(model, inputs, new_tokens=24)
    hf.detach(model)
    same = torch.equal(got, want)
    say(f"[model] generated 3 x 24 tokens through the pool: {got[0, -24:].tolist()}")
    say(f"[model] identical to in-process generation: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit("served generation differed from in-process generation")


def _elastic(pool, spec, reference: MoEStack, say) -> list[Row]:
    rows: list[Row] = []
    hot = {layer: [3 + layer, 9] for layer in range(spec.num_layers)}

    def record(step: str, clients: Clients, window_s: float = 3.0) -> None:
        stats = pool.stats(window_s=window_s)
        rows.append(
            Row(
                step,
                pool.describe().placement_version,
                stats.imbalance,
                len(clients.errors),
                len(clients.failures),
                max(clients.errors, default=0.0),
            )
        )
        r = rows[-1]
        say(
            f"[pool] {step:<34} v{r.version:<3} worst-layer imbalance {r.imbalance:5.2f}  "
            f"{r.requests:>5} answers, {r.failed} failed"
        )

    with Clients(pool, reference) as clients:
        time.sleep(3.0)
        record("uniform traffic", clients)
        clients.shift(hot)
        say("[pool] traffic shifts: each layer's inputs favour 2 hot experts")
        time.sleep(1.5)
        record("hot set, before the rebalance", clients, window_s=1.5)
        _settle(pool, rows[-1].version, quiet_s=CONTROL["rebalance_interval_s"] + 2.0)
        record("after the automatic rebalance", clients)
        r = pool.pin(9, 3, layer=0)
        say(f"[pool] pin hot expert 9 of layer 0 to 3 replicas: +{r.replicas_added} replica(s)")
        r = pool.rebalance()
        say(f"[pool] rebalance around the pin: planned imbalance {r.imbalance_after:.3f}")
        time.sleep(2.0)
        record("hot expert pinned to 3 replicas", clients)
        grown_spec = spec.with_experts_added(4, layer=1)
        grown = _grown(grown_spec, clients.refs[-1])
        with clients.change(grown):
            r = pool.add_experts(4, layer=1)
        say(f"[pool] added experts {list(r.expert_ids)} to layer 1")
        time.sleep(2.0)
        record("4 experts added to layer 1", clients)
        cold = [0, 1]
        smaller = grown_spec.with_experts_removed(grown_spec.flat.flat(2, cold))
        with clients.change(_grown(smaller, grown)):
            pool.remove_experts(cold, layer=2)
        say(f"[pool] removed experts {cold} of layer 2")
        time.sleep(2.0)
        record("2 experts removed from layer 2", clients)
        ray.kill(ray.get_actor(f"{spec.name}:shard:1", namespace="raymoe"), no_restart=False)
        say("[pool] killed shard 1 (Ray restarts it; the pool reloads its experts)")
        t0, answered = time.monotonic(), len(clients.errors)
        while len(clients.errors) < answered + 100 and time.monotonic() - t0 < 30.0:
            time.sleep(0.5)  # requests wait for the shard's experts, then flow again
        say(f"[pool] shard 1 serves again after {time.monotonic() - t0:.1f} s")
        time.sleep(2.0)
        record("shard 1 killed and back", clients)
    return rows


def _settle(pool, version: int, quiet_s: float, timeout_s: float = 40.0) -> None:
    """Wait for the controller to publish a version after ``version``, then for it to
    publish none for ``quiet_s`` (its load window caught up with the shift)."""
    end = time.monotonic() + timeout_s
    last, since = version, time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.5)
        now = pool.describe().placement_version
        if now != last:
            last, since = now, time.monotonic()
        elif last != version and time.monotonic() - since >= quiet_s:
            return


def _grown(spec, old: MoEStack) -> MoEStack:
    """``MoEStack(spec)`` with ``old``'s weights (the seeded init of experts it lacks, as
    the pool draws them)."""
    new = MoEStack(spec).eval()
    state = {}
    for k, v in new.state_dict().items():
        o = old.state_dict()[k]
        state[k] = o if o.shape == v.shape else torch.cat([o, v[len(o) :]])
    new.load_state_dict(state)
    return new


def table(rows: list[Row]) -> str:
    lines = [
        f"{'step':<34}{'version':>8}{'imbalance':>10}{'answers':>9}{'failed':>7}{'max err':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r.step:<34}{r.version:>8}{r.imbalance:>10.2f}{r.requests:>9}{r.failed:>7}"
            f"{r.max_error:>9.1e}"
        )
    return "\n".join(lines)
