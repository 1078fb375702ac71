"""Shared pytest configuration: every fixture module under tests/fixtures is a plugin."""

pytest_plugins = [
    "tests.fixtures.servers",
    "tests.fixtures.fake_langfuse",
    "tests.fixtures.otlp_receiver",
    "tests.fixtures.gcs_server",
    "tests.fixtures.redis_server",
]
