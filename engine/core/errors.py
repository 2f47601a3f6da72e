"""leadflow's one exception root, and the engine's own errors."""


class LeadflowError(Exception):
    """Base class of every error leadflow raises (billing's derive from it too:
    :class:`engine.core.billing_errors.BillingError`)."""


class ConfigError(LeadflowError):
    """A config file is invalid. The message names the file, the path inside it and why."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source, self.path, self.reason = source, path, reason
        where = f"{source}: {path}" if path else source
        super().__init__(f"{where}: {reason}")


class StoreUnavailable(LeadflowError):
    """Redis could not be reached; nothing was charged."""


class EmbeddedRedisError(LeadflowError):
    """The embedded redis-server could not be started."""
