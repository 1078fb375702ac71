"""team-logging-middleware: per-team and per-key logging destinations for ASGI LLM gateways."""

from __future__ import annotations

__version__ = "0.1.0"
