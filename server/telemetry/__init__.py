"""Observability: traces, metrics, the per-call log line and the audit trail.

`observability.Telemetry` is what the Gateway (server/app.py) installs:
observers on the servicer's CallRecords and the router's RoutedCalls, the
tracing interceptor (only when tracing is on: an untraced gateway has no
extra hop per call), and the Prometheus endpoint (only when metrics are on).
`tracing.py`, `metrics.py` and `audit.py` hold the parts; the log line and
the redaction filter are in server/logs.py. This package's `__init__`
imports nothing, so server/auth can import `audit` without a cycle.
"""
