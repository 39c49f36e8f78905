"""Prometheus metrics of the router (served on --metrics-port when it is >= 0)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LIVE = Gauge("specmesh_router_requests_running", "requests in flight")
FINISHED = Counter("specmesh_router_requests_finished", "requests that ended with a finish reason",
                   ["finish_reason"])
ERRORS = Counter("specmesh_router_request_errors", "requests that ended with an error", ["code"])
RESUMED = Counter("specmesh_router_sessions_resumed", "running sessions re-opened on a draft that came back",
                  ["outcome"])
REJECTED = Counter("specmesh_router_admission_rejections", "requests refused at max_concurrent")
TOKENS = Counter("specmesh_router_completion_tokens", "completion tokens delivered")
TTFT = Histogram("specmesh_router_time_to_first_token_seconds", "from admission to the first delivered token",
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ITL = Histogram("specmesh_router_inter_token_latency_seconds", "between delivered tokens (a multi-token chunk "
                "spreads its gap evenly over its tokens)",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2))
