"""Memory shards in the serving app (issue 17): the shard deployments `build_app` adds, and how an
engine replica swaps its in-engine value tables for RemoteValueStores over their handles.

    MemServeIngress -> MemServeEngine replicas --lookup(indices, weights)--> MemoryShard-t{T}-{s}of{P}
                                                                              (P per value table)

One set of shard deployments per application: every engine replica receives handles to the same
deployments (Serve resolves the bound shard applications nested in the engine's constructor
arguments into DeploymentHandles), so the shards are shared and scale on their own. P = 0 (the
default) adds nothing and the engine keeps its local TensorValueStore.

Ray stays out of runtime/: the engine only sees `replace_value_store(name, store)` with a plain
ValueStore (deploy/remote_value_store.py).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from memserve.deploy.memory_shards import ShardSpec, load_specs, parse_replicas, shard_deployment

log = logging.getLogger("memserve.deploy")
REPLICA_REFRESH_S = 5.0  # how often an engine replica re-reads shard replica counts (serve.status: a controller call)


def shard_plan(config) -> dict[str, list[ShardSpec]]:
    """{table name: [ShardSpec]} of an AppConfig ({} when memory_shards = 0). Errors name the flag."""
    if not config.memory_shards:
        return {}
    try:
        plan = load_specs(config.model, config.memory_shards, config.shard_layout)
    except FileNotFoundError as e:
        raise ValueError(f"--memory-shards {config.memory_shards} --shard-layout {config.shard_layout}: {e}") from None
    if not plan:
        raise ValueError(f"--memory-shards {config.memory_shards}: the shard manifest under {config.model} lists "
                         "no value table")
    return plan


def bind_shards(config, env_vars: dict | None = None) -> dict[str, dict[str, list]]:
    """{table: {"specs": [spec dicts], "handles": [bound MemoryShard applications]}} for build_app to
    pass to the engine deployment ({} when memory_shards = 0)."""
    replicas = parse_replicas(config.shard_replicas)
    out = {}
    for table, specs in shard_plan(config).items():
        out[table] = {"specs": [s.to_dict() for s in specs],
                      "handles": [shard_deployment(s, replicas=replicas, num_cpus=config.shard_num_cpus,
                                                   target_ongoing_requests=config.shard_target_ongoing_requests,
                                                   env_vars=env_vars) for s in specs]}
    return out


def attach_remote_stores(engine, shards: dict[str, dict[str, list]], metrics=None, **store_kw) -> list:
    """Serve each sharded table of `engine` from its shard handles; returns the RemoteValueStores."""
    from memserve.deploy.remote_value_store import RemoteValueStore

    stores = []
    local = engine.value_stores()
    for table, plan in shards.items():
        if table not in local:
            raise ValueError(f"memory shards cover table {table!r} but the engine's model has "
                             f"{sorted(local) or 'no memory-layer tables'}: re-run `memserve shard-memory` on this model")
        specs = [ShardSpec(**d) for d in plan["specs"]]
        store = RemoteValueStore.from_specs(specs, plan["handles"], metrics=metrics, **store_kw)
        engine.replace_value_store(table, store)
        stores.append(store)
    missing = sorted(set(local) - set(shards))
    if shards and missing:
        log.warning("value tables %s have no shards: they stay in the engine", missing)
    return stores


class ShardReplicaWatch:
    """Running replicas of each shard deployment, as Serve's controller reports them: GetModelInfo's
    MemoryShardInfo.replicas and the memserve:memory_shard_replicas gauge."""

    def __init__(self, stores: list, app_name: str, replica: str, metrics=None):
        self.stores, self.app_name, self.replica, self.metrics = stores, app_name, replica, metrics
        self.last = 0.0

    def counts(self, status: Any) -> dict[str, int]:
        app = status.applications.get(self.app_name)
        deps = app.deployments if app is not None else {}
        return {n: int(deps[n].replica_states.get("RUNNING", 0)) if n in deps else 0
                for s in self.stores for n in s.names}

    def refresh(self, status: Any) -> None:
        counts = self.counts(status)
        for s in self.stores:
            s.replicas = {n: counts[n] for n in s.names}
        if self.metrics is not None:
            for n, c in counts.items():
                self.metrics.shard_replicas.labels(n, self.replica).set(c)
        self.last = time.monotonic()

    def stale(self, max_age_s: float = REPLICA_REFRESH_S) -> bool:
        return bool(self.stores) and time.monotonic() - self.last >= max_age_s
