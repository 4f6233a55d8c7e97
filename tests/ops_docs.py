"""The metric names docs/ops/'s Grafana dashboard and Prometheus alert rules use: every query's
``rlstream_*`` names, for the unit test (against a fakeredis scrape) and the e2e test (against a
live one). Importable as ``ops_docs`` from every test folder (see tests/polling.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

OPS = Path(__file__).resolve().parents[1] / "docs" / "ops"
NAME = re.compile(r"\brlstream_[a-zA-Z0-9_]+")


def dashboard_exprs() -> list[str]:
    """Every panel target's PromQL and every query variable's."""
    dash = json.loads((OPS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return exprs + [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def named_metrics() -> set[str]:
    return {n for e in dashboard_exprs() + alert_exprs() for n in NAME.findall(e)}
