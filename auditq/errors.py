"""The errors auditq raises for bad configuration, here so that any module can raise them
without importing the option machinery (`config.py`) above it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that does not make sense; the message names it and where it came from."""
