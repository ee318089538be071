"""scope-edge's per-user cache directory, and Numba's on-disk cache put there.

The Numba kernels are compiled with cache=True. Left to itself, Numba writes
their cache next to the source, into site-packages/scope_edge/.../__pycache__/:
files that pip does not know about, so `pip uninstall` (or the uninstall step of
a later `pip install -e .`) leaves site-packages/scope_edge/ behind as a
namespace package that shadows the new install. So scope_edge points Numba at
<user cache>/numba unless the user chose a directory (NUMBA_CACHE_DIR).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

NUMBA_CACHE_ENV = "NUMBA_CACHE_DIR"


def user_cache_dir() -> Path:
    """scope-edge's per-user cache directory for this platform."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "scope-edge"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "scope-edge" / "Cache"
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # XDG: ignore relative
    return base / "scope-edge"


def place_numba_cache() -> None:
    """Numba's cache in <user cache>/numba unless NUMBA_CACHE_DIR is set.
    Called before scope_edge imports Numba; if something imported Numba
    first, its config already read the (unset) variable, so set it there."""
    if os.environ.get(NUMBA_CACHE_ENV):
        return
    path = str(user_cache_dir() / "numba")
    os.environ[NUMBA_CACHE_ENV] = path
    config = sys.modules.get("numba.core.config")
    if config is not None and not config.CACHE_DIR:
        config.CACHE_DIR = path
