"""A custom callback: POST every log record, as JSON, to a team's own webhook.

    python examples/custom_sink.py [gateway options]   # the demo gateway, plus "webhook"

Then any team (or key) can name it like a built-in destination::

    curl -X POST localhost:4000/team/team-1/callback -H 'Authorization: Bearer sk-1234' \\
      -H 'Content-Type: application/json' \\
      -d '{"callback_name": "webhook", "callback_type": "success_and_failure",
           "callback_vars": {"webhook_url": "https://hooks.example.com/llm",
                             "webhook_token": "..."}}'

``webhook_token`` ends in ``_token``, so the admin API masks it and never logs it. A hook that
raises fails that one record (counted as failed in ``GET /health``, with the exception type as
the reason); it never reaches the request. Delivery runs off the request path, in the
dispatcher, with its batching and timeouts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from team_logging_middleware.errors import SinkError
from team_logging_middleware.records import LogRecord
from team_logging_middleware.sinks import CustomLogger, SinkRegistry, register_callback


class WebhookLogger(CustomLogger):
    """One instance per destination (per distinct ``webhook_url`` / ``webhook_token``)."""

    required_vars = ("webhook_url",)
    optional_vars = ("webhook_token",)

    def __init__(self, *, webhook_url: str, webhook_token: str | None = None) -> None:
        if not webhook_url.startswith(("http://", "https://")):
            raise ValueError("webhook_url must be an http(s) URL")
        headers = {"authorization": f"Bearer {webhook_token}"} if webhook_token else {}
        self._url = webhook_url
        self._client = httpx.AsyncClient(headers=headers, timeout=10.0)

    async def log_success_event(self, record: LogRecord) -> None:
        await self._post(record)

    async def log_failure_event(self, record: LogRecord) -> None:
        await self._post(record)

    async def _post(self, record: LogRecord) -> None:
        try:
            response = await self._client.post(self._url, json=record.to_dict())
        except httpx.HTTPError as exc:
            raise SinkError(f"webhook unreachable ({type(exc).__name__})") from None
        if response.status_code >= 400:
            raise SinkError(
                f"webhook answered HTTP {response.status_code}", status=response.status_code
            )

    async def aclose(self) -> None:
        await self._client.aclose()


def install(registry: SinkRegistry | None = None) -> None:
    """Register ``webhook`` (process-wide, or into ``registry`` only)."""
    register_callback("webhook", WebhookLogger, registry=registry, replace=True)


def main() -> None:
    install()  # before the gateway builds its registry
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gateway

    gateway.main()


if __name__ == "__main__":
    main()
