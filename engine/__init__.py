"""leadflow engine: ingest, validation, routing and atomic metering on Redis."""

from engine.core.errors import LeadflowError

__all__ = ["LeadflowError"]
