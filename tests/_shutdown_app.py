"""A small gateway served by ``python -m uvicorn tests._shutdown_app:app`` in the shutdown tests.

Configured from the environment, the way an operator configures a deployment:

``SHUTDOWN_LANGFUSE_HOST``, ``SHUTDOWN_LANGFUSE_PUBLIC_KEY``, ``SHUTDOWN_LANGFUSE_SECRET_KEY``
    the Langfuse project every request of team ``t`` is logged to;
``SHUTDOWN_TIMEOUT``
    seconds the runtime may spend delivering at shutdown (``TeamLogging(shutdown_timeout=)``);
``SHUTDOWN_BATCH_SIZE``, ``SHUTDOWN_FLUSH_INTERVAL``
    the dispatcher's batching;
``SHUTDOWN_LOG_FILE``
    where the process's log lines go (INFO and up), so the test can read what it reported.

Requests with ``Authorization: Bearer key-t`` are team ``t``'s; ``POST /v1/chat/completions``
echoes the last message.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from team_logging_middleware._types import Caller
from team_logging_middleware.config import StaticConfig
from team_logging_middleware.middleware import TeamLoggingMiddleware
from team_logging_middleware.resolver import bearer_token
from team_logging_middleware.runtime import TeamLogging
from team_logging_middleware.sinks import default_registry

_handler = logging.FileHandler(os.environ["SHUTDOWN_LOG_FILE"], encoding="utf-8")
_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
logging.getLogger().addHandler(_handler)
logging.getLogger().setLevel(logging.INFO)


async def _resolve(scope: Any) -> Caller | None:
    token = bearer_token(scope)
    if token is None or not token.startswith("key-"):
        return None
    return Caller(team_id=token.removeprefix("key-"), key_alias=token)


async def _chat(request: Request) -> Response:
    body = await request.json()
    return JSONResponse(
        {
            "id": "chatcmpl-shutdown",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "echo:" + body["messages"][-1]["content"],
                    },
                    "finish_reason": "stop",
                }
            ],
        }
    )


def _build() -> Any:
    registry = default_registry()
    config = StaticConfig.from_dict(
        {
            "default_team_settings": [
                {
                    "team_id": "t",
                    "callbacks": [
                        {
                            "callback_name": "langfuse",
                            "callback_vars": {
                                "langfuse_host": os.environ["SHUTDOWN_LANGFUSE_HOST"],
                                "langfuse_public_key": "os.environ/SHUTDOWN_LANGFUSE_PUBLIC_KEY",
                                "langfuse_secret_key": "os.environ/SHUTDOWN_LANGFUSE_SECRET_KEY",
                            },
                        }
                    ],
                }
            ]
        },
        registry,
    )
    team_logging = TeamLogging(
        _resolve,
        registry=registry,
        config=config,
        shutdown_timeout=float(os.environ["SHUTDOWN_TIMEOUT"]),
        dispatcher_options={
            "batch_size": int(os.environ.get("SHUTDOWN_BATCH_SIZE", "100")),
            "flush_interval": float(os.environ.get("SHUTDOWN_FLUSH_INTERVAL", "1.0")),
            # An export may take as long as the whole shutdown: only the deadline cuts it.
            "emit_timeout": 60.0,
        },
    )
    inner = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
    return TeamLoggingMiddleware(inner, team_logging=team_logging)


app = _build()
