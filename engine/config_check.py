"""Cross-reference and rule checks of a decoded :class:`~engine.config.Config`."""

from __future__ import annotations

from engine.config import Config


def check(cfg: Config) -> None:
    """Raise ConfigError on the first problem found (filled in by the config issue work)."""
