"""Generate Grafana dashboard JSON from code (grafana-foundation-sdk, Grafana's own typed builders).

    python -m memserve.deploy.dashboards_gen           # writes deploy/dashboards/memserve.json
    python -m memserve.deploy.dashboards_gen --check   # exit 1 if the committed JSON is stale

Panels cover what an operator looks at first: requests and errors by code, TTFT / ITL / e2e / queue
percentiles, tokens/s, running and waiting requests, KV-pool usage, KV memory by tier, sessions and
retrieval, replicas. Every expression is queried against a live scrape in tests/helm/test_live_monitoring.py
(each must return data after traffic), so a panel can only name metrics memserve exports today;
memory-layer lookups and memory shards get panels when those metrics exist (issues 16, 17).
helm/sync_monitoring.py copies the file into the chart.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).parent / "dashboards" / "memserve.json"
DS = "${datasource}"
SEL = '{model_name=~"$model"}'


def _q(expr: str, legend: str):
    from grafana_foundation_sdk.builders import prometheus

    return prometheus.Dataquery().expr(expr).legend_format(legend)


def _quantiles(metric: str) -> list:
    return [_q(f'histogram_quantile({q}, sum by (le) (rate(memserve:{metric}_bucket{SEL}[$__rate_interval])))',
               f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)]


def panels() -> list[tuple[str, str, list]]:
    """(title, unit, queries) of each panel, two per row."""
    return [
        ("Requests finished by reason", "reqps",
         [_q(f"sum by (finish_reason) (rate(memserve:request_success_total{SEL}[$__rate_interval]))", "{{finish_reason}}")]),
        ("Errors by gRPC code", "reqps",
         [_q("sum by (code) (rate(memserve:request_errors_total[$__rate_interval]))", "{{code}}")]),
        ("Time to first token", "s", _quantiles("time_to_first_token_seconds")),
        ("Inter-token latency", "s", _quantiles("inter_token_latency_seconds")),
        ("End-to-end request latency", "s", _quantiles("e2e_request_latency_seconds")),
        ("Queue time", "s", _quantiles("request_queue_time_seconds")),
        ("Token throughput", "short",
         [_q(f"sum(rate(memserve:generation_tokens_total{SEL}[$__rate_interval]))", "generated tok/s"),
          _q(f"sum(rate(memserve:prompt_tokens_total{SEL}[$__rate_interval]))", "prompt tok/s")]),
        ("Running / waiting requests", "short",
         [_q(f"sum by (replica) (memserve:num_requests_running{SEL})", "running {{replica}}"),
          _q(f"sum by (replica) (memserve:num_requests_waiting{SEL})", "waiting {{replica}}")]),
        ("KV cache usage", "percentunit", [_q(f"memserve:kv_cache_usage_perc{SEL}", "{{replica}}")]),
        ("KV memory by tier", "bytes", [_q(f"sum by (tier) (memserve:kv_memory_bytes{SEL})", "{{tier}}")]),
        ("Sessions and retrieval", "short",
         [_q(f"sum(memserve:sessions_active{SEL})", "sessions"),
          _q(f"sum(rate(memserve:blocks_retrieved_total{SEL}[$__rate_interval]))", "blocks retrieved/s")]),
        ("Engine replicas", "short", [_q(f"count(memserve:num_requests_running{SEL})", "replicas")]),
    ]


def build() -> dict:
    from grafana_foundation_sdk.builders import dashboard, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    ds = DataSourceRef(type_val="prometheus", uid=DS)
    dash = (dashboard.Dashboard("memserve").uid("memserve-overview").tags(["memserve", "llm"]).refresh("10s")
            .time("now-1h", "now").editable()
            .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
            .with_variable(dashboard.QueryVariable("model").label("model").datasource(ds)
                           .query("label_values(memserve:num_requests_running, model_name)")
                           .include_all(True).multi(True).all_value(".*")))
    for i, (title, unit, queries) in enumerate(panels()):
        p = (timeseries.Panel().title(title).unit(unit).datasource(ds).height(8).span(12)
             .grid_pos(_grid(i)))
        for j, q in enumerate(queries):
            p = p.with_target(q.ref_id(chr(ord("A") + j)).datasource(ds))
        dash = dash.with_panel(p)
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(dash.build()))


def _grid(i: int):
    from grafana_foundation_sdk.models.dashboard import GridPos

    return GridPos(h=8, w=12, x=12 * (i % 2), y=8 * (i // 2))


def exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target, for tests."""
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT} is stale: run python -m memserve.deploy.dashboards_gen")
        return
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
