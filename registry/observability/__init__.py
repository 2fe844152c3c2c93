"""Metrics (Prometheus) and structured logs of the service and its workers."""
