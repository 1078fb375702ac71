"""Who is calling: the ``Caller`` value, the resolver protocol and its TTL/single-flight cache."""

from __future__ import annotations

from ._types import Caller

__all__ = ["Caller"]
