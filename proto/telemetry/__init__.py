"""The telemetry vocabulary every process speaks: the ``lull:*`` metric catalogue and the
node's metrics endpoint (``metrics``), vLLM's own metric names (``vllm_metrics``), and
OpenTelemetry tracing's span and attribute names (``tracing``)."""
