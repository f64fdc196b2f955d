"""Metrics (``metrics``: the ``lull:*`` catalogue, the node endpoint), vLLM's own
metric names (``vllm_metrics``) and OpenTelemetry tracing (``tracing``)."""
