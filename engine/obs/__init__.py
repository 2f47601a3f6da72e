"""Metrics, telemetry and logs: the other layers report through observers."""
