"""Prometheus metrics of one server: its own registry (so several apps in one process, as in the
tests, do not collide), request and token counters, latency histograms, and the engine's gauges
(queue depth, running batch, cache bytes, per-layer expert load) read from `engine.stats()` at
scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets: CPU decoding runs 5-100 ms per token; prefill of a long prompt takes seconds.
_TTFT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]], in_progress: Callable[[], int]) -> None:
        self.stats = stats
        self.in_progress = in_progress

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        yield GaugeMetricFamily("mixlab_queue_depth", "requests waiting for a slot in the running batch",
                                value=float(s.get("waiting", 0)))
        yield GaugeMetricFamily("mixlab_running_requests", "requests in the running batch (the batch size)",
                                value=float(s.get("running", 0)))
        yield GaugeMetricFamily("mixlab_http_requests_in_progress",
                                "HTTP generation requests being answered (and background responses being made)",
                                value=float(self.in_progress()))
        for key, doc in (("cache_used_bytes", "KV cache bytes held by running requests"),
                         ("cache_total_bytes", "KV cache bytes the engine may use")):
            if key in s:
                yield GaugeMetricFamily(f"mixlab_kv_{key}", doc, value=float(s[key]))
        if "weight_panels_bytes" in s:
            yield GaugeMetricFamily("mixlab_weight_panels_bytes",
                                    "memory holding the bf16 weights a second time in the native kernels' panels",
                                    value=float(s["weight_panels_bytes"]))
        cache = s.get("expert_cache")
        if cache:  # offloaded experts
            for key, name, doc in (
                    ("hits", "hits", "expert requests of the MoE layers found in the expert cache"),
                    ("misses", "misses", "expert requests of the MoE layers read from disk first"),
                    ("bytes_read", "read_bytes", "bytes of experts read from disk (on demand and prefetched)"),
                    ("wait_s", "wait_seconds", "time the engine waited for expert reads"),
                    ("prefetched", "prefetched", "experts read ahead by the prefetch thread"),
                    ("prefetch_used", "prefetch_used", "prefetched experts used before eviction")):
                yield CounterMetricFamily(f"mixlab_expert_cache_{name}", doc, value=float(cache[key]))
            yield GaugeMetricFamily("mixlab_expert_cache_slots", "experts the expert cache holds at once",
                                    value=float(cache["slots"]))
            yield GaugeMetricFamily("mixlab_expert_cache_bytes", "memory of the expert cache's slots",
                                    value=float(cache["slots"] * cache["slot_bytes"]))
        if "steps" in s:
            yield CounterMetricFamily("mixlab_engine_steps", "forward passes of the engine", value=float(s["steps"]))
        for key, doc in (("draft_tokens", "tokens drafted by prompt lookup and verified (--speculative-tokens)"),
                         ("accepted_tokens", "drafted tokens the model agreed with and kept")):
            if key in s:  # vLLM's spec_decode_num_draft_tokens / _num_accepted_tokens
                yield CounterMetricFamily(f"mixlab_speculative_{key}", doc, value=float(s[key]))
        adapters = s.get("adapters") or {}
        if adapters:  # serve --lora-modules
            total = CounterMetricFamily("mixlab_adapter_requests", "engine requests submitted under each LoRA adapter",
                                        labels=["adapter"])
            running = GaugeMetricFamily("mixlab_adapter_running_requests",
                                        "requests in the running batch under each LoRA adapter", labels=["adapter"])
            for name, a in adapters.items():
                total.add_metric([name], float(a["requests"]))
                running.add_metric([name], float(a["running"]))
            yield total
            yield running
        load = s.get("expert_load") or []
        if load:
            fam = CounterMetricFamily("mixlab_expert_load_tokens",
                                      "tokens each MoE layer sent to each expert (prompt and generated)",
                                      labels=["layer", "expert"])
            for layer, row in enumerate(load):
                for expert, count in enumerate(row):
                    fam.add_metric([str(layer), str(expert)], float(count))
            yield fam


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mixlab_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("mixlab_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("mixlab_generation_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("mixlab_requests_cancelled",
                                 "engine requests cancelled: the client left, or its background response was cancelled",
                                 registry=r)
        self.ttft = Histogram("mixlab_time_to_first_token_seconds", "request arrival to its first generated token",
                              buckets=_TTFT, registry=r)
        self.itl = Histogram("mixlab_inter_token_latency_seconds", "time between consecutive generated tokens",
                             buckets=_ITL, registry=r)
        self.in_progress = 0
        r.register(_EngineCollector(stats, lambda: self.in_progress))

    def watch_store(self, count: Callable[[], float], size: Callable[[], float]) -> None:
        """Gauges of the Responses API's stored responses, read at scrape time."""
        Gauge("mixlab_responses_stored", "Responses API responses kept for previous_response_id and GET",
              registry=self.registry).set_function(count)
        Gauge("mixlab_responses_stored_bytes", "bytes the stored responses are charged (their JSON and conversation)",
              registry=self.registry).set_function(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
