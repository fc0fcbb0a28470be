"""Integrations with frameworks, each importable only when its framework is installed."""
