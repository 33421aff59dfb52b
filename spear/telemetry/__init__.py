"""Observability of spear on OpenTelemetry: metrics (`metrics`), traces (`tracing`), log lines
(`logs`), and `setup.setup`, which a spear command calls once to export them as `[telemetry]` says.

The package itself imports nothing, so a command that needs only the log format does not pay
for the SDK. observability/README.md lists every metric and span.
"""
