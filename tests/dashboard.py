"""The Grafana dashboard's queries, parsed (``promql-parser``, the Prometheus parser's Rust
port): which metrics and labels each one names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import promql_parser as promql

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "raymoe.json"
# what Grafana fills in before a query reaches Prometheus
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$pool": ".*"}
SUFFIXES = ("_bucket", "_sum", "_count")


def queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets, annotations, variables."""
    d = json.loads(DASHBOARD.read_text())
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    out += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"]["query"])
    return out


def parse(query: str):
    for k, v in VARIABLES.items():
        query = query.replace(k, v)
    if query.startswith("label_values("):  # Grafana's own: label_values(metric, label)
        metric, label = query.removeprefix("label_values(").removesuffix(")").split(", ")
        return promql.parse(f"count by ({label}) ({metric})")
    return promql.parse(query)


def selectors(node) -> Iterator[promql.VectorSelector]:
    """Every metric selector of a parsed query."""
    yield from (n for n in _walk(node) if isinstance(n, promql.VectorSelector))


def grouping(node) -> Iterator[str]:
    """The labels of every ``by (...)`` of a parsed query."""
    for n in _walk(node):
        if isinstance(n, promql.AggregateExpr) and n.modifier is not None:
            yield from n.modifier.labels


def _walk(node) -> Iterator:
    yield node
    if isinstance(node, promql.MatrixSelector):
        yield from _walk(node.vector_selector)
    elif isinstance(node, promql.Call):
        for a in node.args:
            yield from _walk(a)
    elif isinstance(node, promql.BinaryExpr):
        yield from _walk(node.lhs)
        yield from _walk(node.rhs)
    elif isinstance(node, _WRAPPERS):
        yield from _walk(node.expr)


_WRAPPERS = (promql.AggregateExpr, promql.SubqueryExpr, promql.ParenExpr, promql.UnaryExpr)


def base(name: str) -> str:
    """A histogram series' metric: ``x_bucket`` -> ``x``."""
    for s in SUFFIXES:
        if name.endswith(s):
            return name.removesuffix(s)
    return name


def dashboard_metrics() -> set[str]:
    """The exported names of the metrics the dashboard's queries name (histograms without
    their ``_bucket``/``_sum``/``_count``)."""
    return {base(s.name) for q in queries() for s in selectors(parse(q))}
