"""Configuration of the Ray Serve application (validated at the edge with pydantic).

The same object is built from CLI flags (`memserve serve`), from a Serve config YAML
(`deploy/serve_config.yaml`: `args:` of the `memserve.deploy.app:app_builder` import path), or
from Python (tests, the benchmark).
"""

from __future__ import annotations

from typing import Any, Literal

from memserve.deploy.limits import Limits
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_ENGINE_CLS = "memserve.runtime.async_engine:AsyncLLMEngine"
APP_NAME = "memserve"


class AppConfig(BaseModel):
    """Everything that shapes the served application. Every field has a default that works on a
    laptop (2 CPUs): one engine replica on the embedded default model."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field(APP_NAME, description="Serve application name (gRPC clients may send it as the "
                          "`application` metadata; required by Serve when several applications run).")
    topology: Literal["ingress", "direct"] = Field(
        "ingress", description="'ingress': gRPC ingress deployment (validation, routing) in front of engine "
        "replicas, the design's two tiers. 'direct': the engine replicas are the gRPC ingress themselves (Serve's "
        "proxy routes to them with the same router): one Ray hop less per streamed token, see bench/serving.py.")
    model: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct GGUF), an HF directory or a .gguf file.")
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the engine (EngineArgs fields, e.g. num_blocks, block_size, "
        "max_num_seqs, KV-memory settings). Passed through unchanged; the engine validates them.")
    max_waiting: int = Field(64, ge=1, description="Bound of each replica's waiting queue; beyond it a request "
                             "fails fast with RESOURCE_EXHAUSTED (backpressure, never an unbounded queue).")
    num_replicas: int = Field(1, ge=1, description="Engine replicas when autoscaling is off.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config of the engine deployment, e.g. {min_replicas: 1, "
        "max_replicas: 4, target_ongoing_requests: 8}. When set, num_replicas is ignored.")
    engine_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per engine replica in Ray's accounting "
                                   "(fractional so several replicas fit on a small machine; the engine uses "
                                   "torch's own threads regardless).")
    engine_threads: int | None = Field(None, ge=1, description="torch/OpenMP threads of each engine replica "
                                       "(OMP_NUM_THREADS), set explicitly so a CPU engine does not depend on what Ray "
                                       "sets for workers with fractional CPUs; None = all cores of the machine "
                                       "building the app.")
    engine_num_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (1 per accelerator on GPU nodes).")
    ingress_num_cpus: float = Field(0.05, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="Serve's per-replica concurrency cap of the engine deployment; default "
        "max_num_seqs + max_waiting + 8 so the engine's own queue is the one that fills first.")
    max_queued_requests: int = Field(256, ge=1, description="Requests that may wait in the ingress's router "
                                     "when every replica is at max_ongoing_requests (then RESOURCE_EXHAUSTED).")
    unavailable_timeout_s: float = Field(30.0, gt=0, description="How long a request may wait for an engine "
                                         "replica to accept it before failing with UNAVAILABLE.")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="How long a stopping engine replica "
                                               "lets in-flight streams finish (scale-down, redeploy).")
    engine_cls: str = Field(DEFAULT_ENGINE_CLS, description="'module:attr' of the async engine class (a test "
                            "double can be swapped in).")
    sampling_cls: str = Field("memserve.runtime.sampling:SamplingParams", description="'module:attr' of the "
                              "sampling-parameter class the requests are validated with.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Extra environment variables of the "
                                     "replica processes (e.g. OMP_NUM_THREADS, PYTHONPATH).")
    metrics_dir: str | None = Field(None, description="PROMETHEUS_MULTIPROC_DIR shared by the replicas and the "
                                    "exporter; None disables multiprocess metric files.")
    router_seed: int | None = Field(None, description="Seed of the power-of-two-choices sampler (tests).")
    api_keys_file: str | None = Field(None, description="File of 'TENANT KEY' lines (deploy/auth.py), read by the "
                                      "ingress replicas; clients send 'authorization: Bearer KEY'. None: no "
                                      "authentication, every request is tenant 'default' (bind loopback only).")
    allow_remote_without_keys: bool = Field(False, description="Without API keys the ingress answers loopback "
                                            "clients only (UNAUTHENTICATED otherwise: Serve's gRPC proxy binds all "
                                            "interfaces, so the check is the ingress's). True: any peer the network "
                                            "admits (the Helm chart without auth.existingSecret, behind its "
                                            "NetworkPolicy).")
    session_store: str | None = Field(None, description="URL of the durable session store (runtime/session_store.py, "
                                      "fsspec: a directory / PVC mount, file://, s3://, gs:// with the driver "
                                      "installed). Shared by every engine replica: a session is snapshotted after "
                                      "each request on it and loads on whichever replica gets it next. None: "
                                      "sessions live in their replica's RAM only (`memserve serve` defaults to a "
                                      "local directory).")
    memory_shards: int = Field(0, ge=0, description="Memory shards per value table (issue 17, deploy/memory_shards.py): "
                               "P > 0 serves each memory-layer value table from P MemoryShard deployments shared by "
                               "every engine replica (written first by `memserve shard-memory DIR --shards P --layout "
                               "L`); 0 keeps the tables inside each engine replica.")
    shard_layout: Literal["columns", "rows"] = Field(
        "columns", description="How a table is cut: 'columns' (each shard holds every row's columns [c0, c1); "
        "bit-exact with the local table) or 'rows' (rows [r0, r1), partial bags added by the engine; fp32 "
        "re-association, see deploy/memory_shards.py).")
    shard_replicas: str = Field("1:1", description="Replicas of each shard deployment, 'N' or 'MIN:MAX' (MIN < MAX: "
                                "Serve autoscaling on ongoing lookups between the bounds).")
    shard_num_cpus: float = Field(0.0, ge=0, description="CPUs reserved per shard replica in Ray's accounting (0 or "
                                  "fractional: a shard is a memory-bound gather; its threads are capped at 1).")
    shard_retry_timeout_s: float = Field(30.0, gt=0, description="How long an engine replica re-sends a lookup "
                                         "to a shard whose replica died (Serve routes it to another replica or the "
                                         "replacement) before the request fails with UNAVAILABLE naming the shard.")
    shard_target_ongoing_requests: float = Field(2.0, gt=0, description="Serve autoscaling target of in-flight "
                                                 "lookups per shard replica (with shard_replicas MIN:MAX).")
    limits: Limits = Field(default_factory=Limits, description="Bounds per request and per tenant "
                           "(deploy/limits.py): max_tokens, prompt size, messages, stop strings, request size, "
                           "concurrent streams, sessions and memory-tier bytes per tenant.")

    @field_validator("engine_cls", "sampling_cls")
    @classmethod
    def _import_path(cls, v: str) -> str:
        if ":" not in v:
            raise ValueError(f"engine_cls must look like 'package.module:ClassName', got {v!r}")
        return v

    @model_validator(mode="after")
    def _autoscaling(self) -> "AppConfig":
        a = self.autoscaling_config
        if a is not None:
            lo, hi = a.get("min_replicas", 1), a.get("max_replicas", 1)
            if not (0 <= lo <= hi):
                raise ValueError(f"autoscaling_config: need 0 <= min_replicas <= max_replicas, got {lo}, {hi}")
        return self

    @field_validator("shard_replicas")
    @classmethod
    def _shard_replicas(cls, v: str) -> str:
        from memserve.deploy.memory_shards import parse_replicas

        try:
            parse_replicas(v)
        except ValueError as e:
            raise ValueError(f"shard_replicas (--shard-replicas): {e}") from None
        return str(v)

    @model_validator(mode="after")
    def _memory_shards(self) -> "AppConfig":
        if self.memory_shards and (self.model == "default" or self.model.endswith(".gguf")):
            raise ValueError(f"memory_shards (--memory-shards) = {self.memory_shards} needs a memory-layer model "
                             f"directory (HF safetensors with memory_layers in config.json), got model {self.model!r}")
        return self

    def kv_memory_on(self) -> bool:
        return str(self.engine_args.get("kv_memory", "auto")) != "off"

    def resolved_max_ongoing(self) -> int:
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return int(self.engine_args.get("max_num_seqs", 32)) + self.max_waiting + 8
