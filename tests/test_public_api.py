"""The public API: every name a user imports comes from the package root; __all__ is complete."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import team_logging_middleware as tlm

PACKAGE = Path(tlm.__file__).parent


def test_all_names_resolve() -> None:
    for name in tlm.__all__:
        assert hasattr(tlm, name), name


def test_all_lists_every_public_name() -> None:
    public = {
        name
        for name, value in vars(tlm).items()
        if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"
    }
    assert public - set(tlm.__all__) == set()


def test_package_is_typed() -> None:
    assert (PACKAGE / "py.typed").is_file()


def test_version_matches_distribution_metadata() -> None:
    from importlib.metadata import version

    assert version("team-logging-middleware") == tlm.__version__


def test_optional_backends_are_not_imported_by_the_package() -> None:
    # The core import must not pull in the optional extras (fast start, no hard dependency).
    code = (
        "import sys, team_logging_middleware\n"
        "heavy = [m for m in ('opentelemetry.sdk', 'google.cloud.storage', 'redis', 'cryptography')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_every_module_imports() -> None:
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        importlib.import_module(".".join(rel.parts).removesuffix(".__init__"))
