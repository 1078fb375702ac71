"""The repository's benchmark: ``python -m bench.run`` (``make bench``) and its smoke mode.

``bench.app`` is a tiny OpenAI-shaped gateway served under each variant (no middleware, this
package with logging off / to a null sink / to Langfuse, OpenTelemetry's ASGI middleware, a naive
``BaseHTTPMiddleware`` logger); ``bench.run`` drives it with wrk and writes the results.
"""
