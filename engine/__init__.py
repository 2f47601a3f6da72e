"""leadflow engine: ingest, validation, routing and atomic metering on Redis."""

from engine.errors import LeadflowError

__all__ = ["LeadflowError"]
