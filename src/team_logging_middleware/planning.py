"""Settings + caller -> plan (the precedence rules of the README)."""

from __future__ import annotations

from ._types import NO_LOGGING, Destination, Plan

__all__ = ["NO_LOGGING", "Destination", "Plan"]
