"""Serve a pool as a Ray job on a cluster (stop the job to tear the pool down)."""

from __future__ import annotations

import argparse
import os

from raymoe import jobs


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, help="pool spec YAML")
    p.add_argument(
        "--address",
        default=os.environ.get(jobs.ADDRESS_ENV, jobs.DEFAULT_ADDRESS),
        help=f"the Ray job server (${jobs.ADDRESS_ENV}, default {jobs.DEFAULT_ADDRESS})",
    )
    p.add_argument("--name", help="pool name (default: the spec's)")
    p.add_argument("--gateway", metavar="[HOST:]PORT", help="serve the gRPC gateway there")
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQUIREMENT",
        help="a package the cluster's image lacks (repeatable)",
    )
    p.add_argument(
        "--wait", type=float, default=300.0, help="seconds to wait for the pool to serve (300)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from raymoe.cli.serve import with_gateway
    from raymoe.config import PoolSpec

    spec = PoolSpec.from_yaml(args.config)
    if args.gateway:
        with_gateway(spec, args.gateway)  # a bad address fails here, before any job starts
    job = jobs.submit(
        spec,
        address=args.address,
        name=args.name,
        gateway=args.gateway,
        pip=tuple(args.pip),
        wait_s=args.wait,
    )
    print(f"pool {job.pool!r} serves as Ray job {job.job_id} on {job.address}")
    for endpoint in job.gateways:
        print(f"gRPC gateway on {endpoint}: raymoe status --target {endpoint}")
    print(f"logs: ray job logs --address {job.address} -f {job.job_id}")
    print(f"stop (tears the pool down): {job.stop_command}")
    return 0
