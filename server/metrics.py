"""Prometheus metrics, one registry per app (no module-level state)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from backends.base import FinishReason, Usage

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kiln_requests_total", "HTTP requests by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.request_seconds = Histogram("kiln_request_duration_seconds", "HTTP request duration, to the last byte",
                                         ["endpoint"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("kiln_time_to_first_token_seconds", "Request start to the first generated text",
                              ["model"], buckets=_LATENCY, registry=r)
        self.itl = Histogram("kiln_inter_token_latency_seconds", "Time between generated chunks",
                             ["model"], buckets=_TOKEN_GAP, registry=r)
        self.prompt_tokens = Counter("kiln_prompt_tokens_total", "Prompt tokens evaluated or reused", ["model"],
                                     registry=r)
        self.cached_tokens = Counter("kiln_prompt_cached_tokens_total", "Prompt tokens reused from the prefix cache",
                                     ["model"], registry=r)
        self.generated_tokens = Counter("kiln_generated_tokens_total", "Generated tokens", ["model"], registry=r)
        self.finished = Counter("kiln_generations_total", "Finished generations by reason", ["model", "reason"],
                                registry=r)
        self.guardrail_stops = Counter("kiln_guardrail_stops_total", "Generations stopped by a guardrail",
                                       ["model", "reason"], registry=r)
        self.queue_depth = Gauge("kiln_queue_depth", "Requests waiting for a slot or a load", ["model"], registry=r)
        self.active = Gauge("kiln_active_requests", "Requests holding a slot", ["model"], registry=r)
        self.slots = Gauge("kiln_slots", "Slots of each loaded model", ["model"], registry=r)
        self.loaded = Gauge("kiln_loaded_models", "Models loaded now", registry=r)
        self.loads = Counter("kiln_model_loads_total", "Model loads", ["model"], registry=r)
        self.load_seconds = Histogram("kiln_model_load_seconds", "Model load duration", ["model"],
                                      buckets=_LATENCY, registry=r)
        self.unloads = Counter("kiln_model_unloads_total", "Model unloads", ["model"], registry=r)
        self.unload_seconds = Histogram("kiln_model_unload_seconds", "Model unload duration", ["model"],
                                        buckets=_LATENCY, registry=r)
        self.restarts = Counter("kiln_worker_restarts_total", "Worker processes restarted after dying", ["model"],
                                registry=r)
        # The Gateway API Inference Extension's model server protocol (TotalQueuedRequests,
        # TotalRunningRequests, KVCacheUtilization; vLLM's num_requests_waiting/_running,
        # kv_cache_usage_perc): so routers (llm-d's EPP, SMG) can read kiln's load. A llama.cpp
        # slot owns a fixed share of the KV cache, so slots in use / slots is the KV share reserved.
        self.waiting = Gauge("kiln_requests_waiting", "Requests waiting for a slot or a load (all models)",
                             registry=r)
        self.running = Gauge("kiln_requests_running", "Requests holding a slot (all models)", registry=r)
        self.slot_usage = Gauge("kiln_kv_cache_usage_ratio", "Slots in use / slots of the loaded models (0-1); "
                                "each slot reserves its share of the KV cache", registry=r)
        self.upstream_up = Gauge("kiln_upstream_replica_up", "1 if an upstream replica takes requests",
                                 ["upstream", "replica"], registry=r)
        self.upstream_inflight = Gauge("kiln_upstream_replica_requests", "Requests in flight on an upstream replica",
                                       ["upstream", "replica"], registry=r)
        self.stream_errors = Counter("kiln_stream_errors_total", "Streams that ended with an in-stream error",
                                     ["model"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def on_model(self, event: str, model: str, seconds: float) -> None:
        if event == "load":
            self.loads.labels(model).inc()
            self.load_seconds.labels(model).observe(seconds)
        elif event == "unload":
            self.unloads.labels(model).inc()
            self.unload_seconds.labels(model).observe(seconds)
            for g in (self.slots, self.active):
                with contextlib.suppress(KeyError):
                    g.remove(model)
        elif event == "restart":
            self.restarts.labels(model).inc()

    def on_result(self, model: str, usage: Usage, finish: FinishReason) -> None:
        self.prompt_tokens.labels(model).inc(usage.prompt_tokens)
        self.cached_tokens.labels(model).inc(usage.cached_tokens)
        self.generated_tokens.labels(model).inc(usage.completion_tokens)
        self.finished.labels(model, finish.value).inc()
        if finish == FinishReason.LOOP:
            self.guardrail_stops.labels(model, "loop").inc()

    def sample(self, runners: list, waiting: dict[str, int]) -> None:
        """Gauges are read off the scheduler when scraped."""
        self.loaded.set(len(runners))
        for r in runners:
            self.slots.labels(r.manifest.name).set(r.num_parallel)
            self.active.labels(r.manifest.name).set(r.refcount)
        for key, n in waiting.items():
            self.queue_depth.labels(key).set(n)
        slots = sum(r.num_parallel for r in runners)
        self.waiting.set(sum(waiting.values()))
        self.running.set(sum(r.refcount for r in runners))
        self.slot_usage.set(sum(r.refcount for r in runners) / slots if slots else 0.0)

    def sample_upstreams(self, status: dict) -> None:
        for name, u in status.items():
            for rep in u["replicas"]:
                self.upstream_up.labels(name, rep["url"]).set(1 if rep["up"] else 0)
                self.upstream_inflight.labels(name, rep["url"]).set(rep["inflight"])
