"""matrix.yaml -> validated, typed configuration.

Validation happens before anything is downloaded or booted, and every problem is reported
as one message naming the file, the field and the fix. The models live in kmatrix.matrixfile
(``sections``: guest, probe, oom, archives and sizes; ``kernels``: the kernel entries;
``matrix``: the whole file); this module reads the file, turns pydantic's errors into that
one message, and re-exports the models under the names callers import from here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kmatrix.errors import UserError
from kmatrix.matrixfile.kernels import KERNEL_TAGS
from kmatrix.matrixfile.kernels import DebianKernel as DebianKernel
from kmatrix.matrixfile.kernels import DockerKernel as DockerKernel
from kmatrix.matrixfile.kernels import Kernel as Kernel
from kmatrix.matrixfile.kernels import LocalKernel as LocalKernel
from kmatrix.matrixfile.kernels import QemuKernel as QemuKernel
from kmatrix.matrixfile.matrix import Matrix as Matrix
from kmatrix.matrixfile.sections import GUEST_OVERHEAD as GUEST_OVERHEAD
from kmatrix.matrixfile.sections import MAX_SIZE as MAX_SIZE
from kmatrix.matrixfile.sections import MIN_GUEST_MEMORY as MIN_GUEST_MEMORY
from kmatrix.matrixfile.sections import MIN_OOM_MEMORY as MIN_OOM_MEMORY
from kmatrix.matrixfile.sections import NAME_RE as NAME_RE
from kmatrix.matrixfile.sections import ArchiveConfig as ArchiveConfig
from kmatrix.matrixfile.sections import GuestConfig as GuestConfig
from kmatrix.matrixfile.sections import OomConfig as OomConfig
from kmatrix.matrixfile.sections import ProbeConfig as ProbeConfig
from kmatrix.matrixfile.sections import Size as Size
from kmatrix.matrixfile.sections import parse_size as parse_size
from kmatrix.units import MIB as MIB


def check_local_paths(kernels: Sequence[Kernel], source: str) -> None:
    """The files kernel entries name exist and have the right type (before any download)."""
    for k in kernels:
        k.check_files(source)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _known_keys() -> list[str]:
    models: list[type[BaseModel]] = [
        Matrix, GuestConfig, ProbeConfig, OomConfig, DebianKernel, LocalKernel, DockerKernel,
        ArchiveConfig,
    ]  # fmt: skip
    return sorted({name for m in models for name in m.model_fields})


def _strip_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Without the parts pydantic adds that name no key: validator functions, kernel kinds."""
    loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith("function-")))
    if len(loc) > 2 and loc[0] == "kernels" and isinstance(loc[1], int) and loc[2] in KERNEL_TAGS:
        loc = loc[:2] + loc[3:]
    return loc


def _describe(err: Any) -> str:
    loc = _strip_tags(tuple(err["loc"]))
    where = _loc(loc)
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "remove it"
        return f"{where}: unknown key; {hint}"
    if err["type"] == "missing":
        return f"{where}: required field is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if loc and re.match(r"^[a-z_]+: ", msg):  # a model's own check names its field
        return f"{where}.{msg}"
    return msg if not loc else f"{where}: {msg}"


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in the YAML file repeats a key (YAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise DuplicateKeyError(f"line {line}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_matrix(text: str, source: str = "matrix.yaml") -> Matrix:
    """Parse and validate matrix.yaml text; raise UserError naming file and field on error."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKeyError as exc:
        raise UserError(f"{source}: {exc}; keep one of them") from None
    except yaml.YAMLError as exc:
        # PyYAML's message spans lines (with a caret); one line is enough with the position.
        raise UserError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with a kernels: list at the top level")
    try:
        return Matrix.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise UserError(f"{source}: " + "; ".join(lines)) from None


def load_matrix(path: Path) -> Matrix:
    """Read and validate a matrix file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the matrix file as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the matrix file ({exc.strerror})") from None
    return parse_matrix(text, str(path))
