"""The admin CLI on a real pool through its gateway: every command changes the running pool as
it says (checked through describe), exit codes, ``raymoe serve --gateway``, weights from an
``.npz``, and the TLS flags."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import raymoe
from raymoe import MoELayer, PoolSpec
from raymoe._private.data.gateway import Gateway, GatewayThread
from raymoe._private.gateway_actor import RayPoolBackend
from raymoe.cli import main
from raymoe.config import GatewaySpec
from tests.helpers import free_port, spec_dict
from tests.integration.gateway_common import (
    ADMIN,
    DATA,
    D,
    E,
    gateway_spec,
    want,
)

pytestmark = pytest.mark.integration


# --- admin CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli_pool(ray_cluster, tokens):
    pool = raymoe.serve(gateway_spec("gw-cli", tokens))
    (endpoint,) = pool.gateways()
    yield pool, ["--target", endpoint, "--token-file", str(tokens / "admin")]
    pool.shutdown()


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_admin_changes_the_running_pool(cli_pool, capsys):
    pool, conn = cli_pool
    rc, out, _ = _cli(capsys, "status", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["pool"]["shards"] == 2

    rc, out, _ = _cli(capsys, "experts", "replicate", "3", "2", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["replicas_added"] == 1
    assert pool.describe().replicas == E + 1

    rc, out, _ = _cli(capsys, "experts", "add", "2", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["expert_ids"] == [E, E + 1]
    assert pool.describe().experts == E + 2

    v = pool.describe().placement_version
    rc, _, err = _cli(capsys, "experts", "remove", str(E + 1), *conn)  # stdin is no terminal
    assert rc == 5 and "--yes" in err
    assert pool.describe().placement_version == v
    rc, out, _ = _cli(capsys, "experts", "remove", str(E + 1), *conn, "--yes", "-o", "json")
    assert rc == 0 and json.loads(out)["removed"] == [E + 1]
    assert pool.describe().removed == (E + 1,)

    rc, out, _ = _cli(capsys, "rebalance", "--dry-run", *conn)
    assert rc == 0 and "dry run" in out
    rc, _, _ = _cli(capsys, "shards", "scale", "3", *conn)
    assert rc == 0 and pool.describe().shards == 3
    rc, _, _ = _cli(capsys, "shards", "drain", "2", *conn, "--yes")
    assert rc == 0 and pool.describe().experts_per_shard[2] == 0
    rc, out, _ = _cli(capsys, "experts", "pin", "0", "2", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["pinned"] == {"0": 2}
    rc, out, _ = _cli(capsys, "experts", "unpin", "0", *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["pinned"] == {}
    rc, out, _ = _cli(capsys, "top", "--iterations", "2", "--interval", "0.1", *conn)
    assert rc == 0 and out.count("SHARD") == 2


def test_cli_exit_codes(cli_pool, tokens, capsys):
    _, conn = cli_pool
    target = conn[:2]
    assert _cli(capsys, "experts", "replicate", "99", "1", *conn)[0] == 2
    rc, _, err = _cli(capsys, "status", *target, "--token-file", str(tokens / "data"))
    assert rc == 4 and "admin plane" in err and DATA not in err
    assert _cli(capsys, "status", *target)[0] == 4
    assert _cli(capsys, "status", "--target", "127.0.0.1:1", "--timeout", "1")[0] == 3
    assert _cli(capsys, "status", *target, "--token-file", "/nonexistent")[0] == 2


def test_cli_plot_load_draws_the_pools_real_load(cli_pool, tokens, capsys, tmp_path):
    pool, conn = cli_pool
    data = ["--target", conn[1], "--token-file", str(tokens / "data")]  # a data token suffices
    pool.replicate(5, 2)  # expert 5: on both shards, its pairs dealt in turn
    x = torch.randn(64, D)
    ids = torch.tensor([[5, 1]] * 48 + [[6, 2]] * 16)
    pool.forward(x, expert_ids=ids, weights=torch.full((64, 2), 0.5))
    stats = raymoe.Client(conn[1], token=DATA).stats(60, load_bins=E)
    assert stats.load_map.shape == (2, E)
    assert np.allclose(stats.load_map.sum(axis=0), stats.expert_load)
    assert stats.load_map[0, 5] == stats.load_map[1, 5] == 24  # 48 pairs over 2 replicas
    # attributed by the placement, the map's shards carry what the routers sent them
    assert np.allclose(stats.load_map.sum(axis=1), stats.pairs_per_shard)

    out = tmp_path / "load.png"
    argv = ["plot", "load", *data, "--out", str(out), "--samples", "2", "--interval", "0.2"]
    rc, printed, err = _cli(capsys, *argv, "-o", "json")
    assert rc == 0, err
    assert json.loads(printed) == {"out": str(out), "shards": 2, "bins": E, "samples": 2}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert _cli(capsys, "plot", "load", *data, "--out", str(tmp_path / "no/dir.png"))[0] == 2
    assert _cli(capsys, "plot", "load", *data, "--out", str(out), "--bins", "0")[0] == 2


# --- TLS -----------------------------------------------------------------------------------


def _certificates(d: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(name, key, issuer, issuer_key, ca=False, sans=()):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(name, key, crt):
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (d / f"{name}.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raymoe test CA")])
    ca = cert("raymoe test CA", ca_key, ca_name, ca_key, ca=True)
    write("ca", ca_key, ca)
    sans = (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        write(name, key, cert(name, key, ca_name, ca_key, sans=sans if name == "server" else ()))
    return {n: str(d / n) for n in ("ca", "server", "client")}


def test_mutual_tls_with_a_certificate_made_here(served, tmp_path):
    pool, _, layer = served
    c = _certificates(tmp_path)
    spec = PoolSpec.from_dict(pool.describe().spec)
    cfg = GatewaySpec(
        enabled=True,
        host="127.0.0.1",
        port=0,
        data_token_file=None,
        tls_cert_file=c["server"] + ".pem",
        tls_key_file=c["server"] + ".key",
        tls_client_ca_file=c["ca"] + ".pem",
    )
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(4))
    with GatewayThread(Gateway(spec, RayPoolBackend(spec.name), config=cfg)) as g:
        tls = raymoe.TLS(
            ca_file=c["ca"] + ".pem", cert_file=c["client"] + ".pem", key_file=c["client"] + ".key"
        )
        with raymoe.Client(g.endpoint, tls=tls) as client:
            assert (client.forward(x) - want(layer, x)).abs().max() <= 1e-5
        no_cert = raymoe.TLS(ca_file=c["ca"] + ".pem")
        for refused in (no_cert, None):  # no client certificate; no TLS at all
            with (
                raymoe.Client(g.endpoint, tls=refused, retries=0, timeout_s=5) as client,
                pytest.raises(raymoe.PoolUnavailableError),
            ):
                client.forward(x)


def test_cli_tls_flags_reach_a_mutual_tls_gateway(served, tmp_path, capsys, monkeypatch):
    pool, _, _ = served
    c = _certificates(tmp_path)
    spec = PoolSpec.from_dict(pool.describe().spec)
    monkeypatch.setenv("RAYMOE_ADMIN_TOKEN", ADMIN)
    cfg = GatewaySpec(enabled=True, host="127.0.0.1", port=0, data_token_file=None,
                      tls_cert_file=c["server"] + ".pem", tls_key_file=c["server"] + ".key",
                      tls_client_ca_file=c["ca"] + ".pem")  # fmt: skip
    token = tmp_path / "token"
    token.write_text(ADMIN)
    with GatewayThread(Gateway(spec, RayPoolBackend(spec.name), config=cfg)) as g:
        conn = ["--target", g.endpoint, "--token-file", str(token), "--timeout", "10"]
        tls = ["--ca-file", c["ca"] + ".pem", "--server-name", "localhost"]
        mine = ["--cert-file", c["client"] + ".pem", "--key-file", c["client"] + ".key"]
        rc, out, _ = _cli(capsys, "status", *conn, *tls, *mine, "-o", "json")
        assert rc == 0 and json.loads(out)["pool"]["name"] == "gw"
        rc, _, err = _cli(capsys, "status", *conn, *tls)  # no client certificate: refused
        assert rc == 3, err
        rc, _, err = _cli(capsys, "status", *conn)  # no TLS at all: refused
        assert rc == 3, err


def test_experts_add_with_weights_from_an_npz(cli_pool, capsys, tmp_path):
    pool, conn = cli_pool
    spec = PoolSpec.from_dict(pool.describe().spec)
    g = torch.Generator().manual_seed(11)
    extra = {"experts.w_gate": torch.randn(2, 24, D, generator=g) * 0.2,
             "experts.w_up": torch.randn(2, 24, D, generator=g) * 0.2,
             "experts.w_down": torch.randn(2, D, 24, generator=g) * 0.2,
             "router.weight": torch.randn(2, D, generator=g) * 3}  # fmt: skip
    path = tmp_path / "new.npz"
    np.savez(path, **{k: v.numpy() for k, v in extra.items()})
    rc, out, _ = _cli(capsys, "experts", "add", "2", "--weights", str(path), *conn, "-o", "json")
    assert rc == 0 and json.loads(out)["expert_ids"] == [E, E + 1]
    grown = MoELayer(spec.with_experts_added(2)).eval()
    sd = MoELayer(spec).state_dict()
    grown.load_state_dict({k: torch.cat([sd[k], extra[k]]) if k in extra else sd[k] for k in sd})
    x = torch.randn(40, D, generator=g)
    with torch.no_grad():
        _, info = grown(x, return_info=True)
        assert torch.isin(info.expert_ids, torch.tensor([E, E + 1])).any()  # they serve
        assert (pool.forward(x) - grown(x)).abs().max().item() <= 1e-5
    bad = tmp_path / "bad.npz"
    np.savez(bad, **{"experts.w_up": np.ones((3, 3), np.float32)})
    rc, _, err = _cli(capsys, "experts", "add", "2", "--weights", str(bad), *conn)
    assert rc == 2 and "experts.w_up" in err
    rc, _, err = _cli(capsys, "experts", "add", "2", "--weights", str(tmp_path / "none.npz"), *conn)
    assert rc == 2 and "--weights" in err


def test_raymoe_serve_with_a_gateway_serves_until_its_duration(ray_cluster, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    import threading

    port = free_port()
    monkeypatch.setenv("RAYMOE_DATA_TOKEN", DATA)
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(PoolSpec.from_dict(spec_dict({"kind": "topk", "k": 2}, E=4, d=D)).to_yaml())
    argv = ["serve", "-c", str(cfg), "--name", "t-serve-gw", "--gateway", f"127.0.0.1:{port}",
            "--interval", "0.5", "--duration", "20"]  # fmt: skip
    served_rc: list[int] = []
    t = threading.Thread(target=lambda: served_rc.append(main(argv)))
    t.start()
    try:
        with raymoe.Client(f"127.0.0.1:{port}", token=DATA, retries=20, timeout_s=60) as c:
            end = time.monotonic() + 60
            while c.health() != "SERVING":
                assert time.monotonic() < end, "the served pool's gateway never said SERVING"
                time.sleep(0.2)
            x = torch.randn(5, D)
            ref = MoELayer(PoolSpec.from_yaml(cfg)).eval()
            assert (c.forward(x) - want(ref, x)).abs().max() <= 1e-5
    finally:
        t.join(timeout=120)
    assert served_rc == [0]
    assert f"gRPC gateway on 127.0.0.1:{port}" in capsys.readouterr().out
    with pytest.raises(raymoe.PoolNotFoundError):
        raymoe.connect("t-serve-gw")  # shut down on exit
