"""The runner image: QEMU and kmatrix in one Docker image, built without any registry.

`invoke cell --runtime docker` runs a cell in this image, so every Docker host boots its
kernels with the same QEMU. The image is ``FROM`` either ``debian:bookworm-slim`` (when the
engine has it or can pull it) or a base made here from Debian packages with ``debootstrap``
and ``docker import`` -- the path that works where no registry is reachable. QEMU and Python
come from the host's Debian mirror (a build arg, read from the host's apt sources); the
project's Python dependencies are downloaded as wheels on the host, because containers do
not trust a TLS-intercepting proxy the host may sit behind.

Tags are content hashes (base image id, Dockerfile, project files, wheel set), so an
unchanged project is never rebuilt; the debootstrap base is cached by its own tag.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import docker.errors
import requests.exceptions

from kmatrix.artifacts import image_content_hash, sha256_of
from kmatrix.backends.docker import LABEL, connect
from kmatrix.config import load_matrix
from kmatrix.debian.archive import default_cache_dir, resolve_mirror
from kmatrix.errors import InfraError, UserError
from kmatrix.guest.probe_image import docker_build, write_build_context
from kmatrix.guest.userland import IMAGES_DIR, ROOT
from kmatrix.resources import is_checkout

DOCKERFILE = IMAGES_DIR / "runner" / "Dockerfile"
IMAGE_REPO = "kmatrix-runner"
BASE_REPO = "kmatrix-runner-base"
#: The base used when the engine has it or can pull it.
PULL_BASE = "debian:bookworm-slim"
SUITE = "bookworm"
#: Bump when the debootstrap recipe below changes, so cached bases are rebuilt.
BASE_LAYOUT = 1
#: Bump when the wheel download recipe changes.
WHEELS_LAYOUT = 1

BaseChoice = Literal["auto", "pull", "debootstrap"]

#: What of the project goes into the image: the code and the files it reads at run time.
PROJECT_PATHS = ("tasks.py", "pyproject.toml", "matrix.yaml", "src", "probes", "images")
_SKIP_PARTS = ("__pycache__", ".mypy_cache", ".pytest_cache")
_SKIP_SUFFIXES = (".pyc", ".pyo")
_EXECUTABLES = frozenset({"images/guest/init"})

#: Wheel tags the image's interpreter accepts: CPython 3.11 on bookworm's glibc 2.36, x86_64.
PIP_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux_2_12_x86_64",
    "manylinux2010_x86_64",
    "manylinux_2_5_x86_64",
    "manylinux1_x86_64",
    "any",
)

DEBOOTSTRAP_TIMEOUT = 900
PIP_TIMEOUT = 900
PULL_TIMEOUT = 300
TAR_TIMEOUT = 300
#: Seconds the engine may stay silent during the build (apt-get install of QEMU is the long
#: step; it prints as it goes).
BUILD_TIMEOUT = 1800


@dataclass(frozen=True)
class RunnerImage:
    """A runner image on the engine."""

    tag: str
    content_hash: str
    base: str  # the image it was built FROM
    built: bool  # False when an image with this content hash already existed


# --------------------------------------------------------------------------------------------
# Pure parts: what goes in, and how it is hashed
# --------------------------------------------------------------------------------------------


def project_requirements(pyproject: bytes) -> list[str]:
    """The runtime dependencies listed in pyproject.toml (the dev extras stay out)."""
    data = tomllib.loads(pyproject.decode())
    deps = data.get("project", {}).get("dependencies", [])
    return [str(d) for d in deps]


def pip_download_argv(python: str, requirements: Path, dest: Path) -> list[str]:
    """``pip download`` of binary wheels for the image's interpreter, not the host's."""
    argv = [python, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
    argv += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    argv += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for platform in PIP_PLATFORMS:
        argv += ["--platform", platform]
    return [*argv, "-d", str(dest), "-r", str(requirements)]


def debootstrap_argv(rootfs: Path, mirror: str, suite: str = SUITE) -> list[str]:
    """A minimal Debian root (apt, dpkg, bash and little else) from ``mirror``."""
    return ["debootstrap", "--variant=minbase", "--arch=amd64", suite, str(rootfs), mirror]


def base_tag(suite: str = SUITE) -> str:
    """``kmatrix-runner-base:<hash of the recipe>`` (the mirror is not part of it)."""
    argv = debootstrap_argv(Path("ROOT"), "MIRROR", suite)
    recipe = json.dumps({"layout": BASE_LAYOUT, "suite": suite, "argv": argv})
    return f"{BASE_REPO}:{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"


def _wanted(rel: Path) -> bool:
    return not any(p in _SKIP_PARTS or p.endswith(".egg-info") for p in rel.parts) and (
        rel.suffix not in _SKIP_SUFFIXES
    )


def project_files(root: Path = ROOT) -> dict[str, bytes]:
    """The project files the image carries, by path relative to the project root."""
    files: dict[str, bytes] = {}
    for name in PROJECT_PATHS:
        path = root / name
        candidates: Iterable[Path] = sorted(path.rglob("*")) if path.is_dir() else [path]
        for p in candidates:
            rel = p.relative_to(root)
            if p.is_file() and not p.is_symlink() and _wanted(rel):
                files[str(rel)] = p.read_bytes()
    return files


def _wheel_files(wheels: Path) -> list[Path]:
    """The files of the wheel directory (requirements.txt too; not .complete), by name."""
    return [p for p in sorted(wheels.iterdir()) if p.is_file() and not p.name.startswith(".")]


def wheel_set(wheels: Path) -> dict[str, str]:
    """File name -> SHA256 of every file in the wheel directory."""
    return {p.name: sha256_of(p) for p in _wheel_files(wheels)}


def content_hash(
    base_id: str, dockerfile: bytes, project: dict[str, bytes], wheels: dict[str, str]
) -> str:
    """Hash of every input of the image (pure): the tag changes exactly when they do."""
    return image_content_hash(
        ("base", base_id), dockerfile, ("project", project), ("wheel", wheels)
    )


def build_args(base: str, mirror: str, environ: dict[str, str]) -> dict[str, str]:
    """The Dockerfile's build args, plus the host's proxy settings (Docker predefines those)."""
    args = {"BASE": base, "MIRROR": mirror.rstrip("/"), "SUITE": SUITE}
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        if environ.get(name):
            args[name] = environ[name]
    return args


def write_context(dest: Path, dockerfile: bytes, wheels: Path, project: dict[str, bytes]) -> None:
    """The build context as a tar: Dockerfile, wheels/ (with requirements.txt), project/."""
    write_build_context(
        dest,
        dockerfile,
        {f"wheels/{p.name}": p for p in _wheel_files(wheels)},
        {f"project/{name}": data for name, data in project.items()},
        {f"project/{name}" for name in _EXECUTABLES},
    )


# --------------------------------------------------------------------------------------------
# Wheels, base, build: the parts that run things
# --------------------------------------------------------------------------------------------


def _run(argv: list[str], timeout: float, what: str, hint: str = "") -> None:
    """Run a build step; its failure is an InfraError quoting the step's last output."""
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=timeout)
    except FileNotFoundError:
        raise InfraError(f"{what}: {argv[0]} not found{hint}") from None
    except subprocess.TimeoutExpired:
        raise InfraError(f"{what}: no result after {timeout:.0f} s") from None
    except subprocess.CalledProcessError as exc:
        tail = exc.stderr.decode(errors="replace").strip()[-600:]
        raise InfraError(f"{what} failed (exit {exc.returncode}): {tail}") from None


def ensure_wheels(cache: Path, log: Callable[[str], None] = print) -> Path:
    """The project's dependencies as wheels for the image, downloaded once per requirement set."""
    requirements = project_requirements((ROOT / "pyproject.toml").read_bytes())
    req_text = "\n".join(requirements) + "\n"
    key_src = json.dumps({"layout": WHEELS_LAYOUT, "req": requirements, "tags": PIP_PLATFORMS})
    dest = cache / "runner" / "wheels" / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    if (dest / ".complete").exists():
        return dest
    log("downloading the runner image's Python wheels")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (dest / "requirements.txt").write_text(req_text)
    argv = pip_download_argv(sys.executable, dest / "requirements.txt", dest)
    _run(argv, PIP_TIMEOUT, "pip download of the runner image's wheels")
    (dest / ".complete").touch()
    return dest


def _image_id(client: Any, ref: str) -> str | None:
    try:
        return str(client.images.get(ref).id)
    except docker.errors.ImageNotFound:
        return None


def _try_pull(client: Any, ref: str, log: Callable[[str], None]) -> str | None:
    """Pull ``ref``; its id, or None (with the reason logged) when no registry answers."""
    api = client.api
    old_timeout, api.timeout = api.timeout, PULL_TIMEOUT
    try:
        repo, tag = ref.split(":", 1)
        client.images.pull(repo, tag=tag)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        log(f"cannot pull {ref} ({reason})")
        return None
    finally:
        api.timeout = old_timeout
    return _image_id(client, ref)


def debootstrap_base(
    client: Any, mirror: str, cache: Path, log: Callable[[str], None] = print
) -> str:
    """``kmatrix-runner-base:<hash>``: a debootstrap minbase imported into the engine (once)."""
    tag = base_tag()
    if _image_id(client, tag):
        return tag
    if os.geteuid() != 0:
        raise UserError(
            f"building the runner base {tag} needs root (debootstrap); run `invoke images "
            f"--runner` once as root, or make {PULL_BASE} available (`docker pull` or "
            "`docker load`)"
        )
    log(f"building {tag} with debootstrap from {mirror} (about a minute)")
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix="runner-base."))
    try:
        rootfs, tarball = tmp / "rootfs", tmp / "rootfs.tar"
        hint = "; install it: apt-get install debootstrap"
        _run(debootstrap_argv(rootfs, mirror), DEBOOTSTRAP_TIMEOUT, "debootstrap", hint)
        # Downloaded .debs and indexes: 30+ MB the image does not need.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        _run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."],
            TAR_TIMEOUT,
            "tar of the runner base",
        )
        _import(client, tarball, tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tag


def _import(client: Any, tarball: Path, tag: str) -> None:
    repo, version = tag.split(":", 1)
    changes = [f"LABEL {LABEL}=1", 'CMD ["/bin/bash"]']
    try:
        client.api.import_image_from_file(
            str(tarball), repository=repo, tag=version, changes=changes
        )
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise InfraError(f"docker import of {tag} failed: {str(exc)[:300]}") from None


def ensure_base(
    client: Any, mirror: str, cache: Path, how: BaseChoice, log: Callable[[str], None] = print
) -> str:
    """The image to build FROM: the slim Debian image if available, else the debootstrap base.

    ``auto`` looks at local images first (either base), so once a base exists no registry
    is contacted again: a registry that hangs instead of failing costs time only once.
    """
    if how != "debootstrap" and _image_id(client, PULL_BASE):
        return PULL_BASE
    if how == "auto" and _image_id(client, base_tag()):
        return base_tag()
    if how != "debootstrap" and _try_pull(client, PULL_BASE, log):
        return PULL_BASE
    if how == "pull":
        raise InfraError(f"cannot pull {PULL_BASE}; use --base debootstrap (needs root)")
    return debootstrap_base(client, mirror, cache, log)


def require_checkout() -> None:
    """Refuse to build the runner image outside a kmatrix checkout, saying what to do.

    The image carries the project tree (tasks.py, src/, pyproject.toml), not a wheel.
    """
    if not is_checkout():  # the data root being package data means: no checkout
        raise UserError(
            "--runtime docker and `images --runner` build the runner image from a kmatrix "
            "checkout; run them from a clone of the kmatrix repository"
        )


def ensure_runner_image(
    client: Any,
    mirror: str,
    cache: Path,
    base: BaseChoice = "auto",
    log: Callable[[str], None] = print,
) -> RunnerImage:
    """The runner image for this project, built only when its content-hash tag is missing."""
    require_checkout()
    wheels = ensure_wheels(cache, log)
    base_ref = ensure_base(client, mirror, cache, base, log)
    base_id = _image_id(client, base_ref) or base_ref
    dockerfile = DOCKERFILE.read_bytes()
    project = project_files()
    digest = content_hash(base_id, dockerfile, project, wheel_set(wheels))
    tag = f"{IMAGE_REPO}:{digest}"
    if _image_id(client, tag):
        return RunnerImage(tag, digest, base_ref, built=False)
    log(f"building docker image {tag} FROM {base_ref}")
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=work, prefix="runner-context.", suffix=".tar") as ctx:
        write_context(Path(ctx.name), dockerfile, wheels, project)
        ctx.seek(0)
        args = build_args(base_ref, mirror, dict(os.environ))
        # Host networking: apt inside the build reaches the mirror exactly as the host does
        # (a proxy or mirror on the host's loopback included).
        docker_build(
            client,
            ctx,
            tag,
            digest,
            timeout=BUILD_TIMEOUT,
            buildargs=args,
            network_mode="host",
            log=log,
        )
    return RunnerImage(tag, digest, base_ref, built=True)


def check_base(base: str) -> BaseChoice:
    """``--base`` as a BaseChoice; anything else is a UserError naming the choices."""
    choices: tuple[BaseChoice, ...] = ("auto", "pull", "debootstrap")
    for choice in choices:
        if base == choice:
            return choice
    raise UserError(f"--base {base!r}: use one of {', '.join(choices)}")


def build_runner_image(
    matrix_path: Path, base: str = "auto", log: Callable[[str], None] = print
) -> RunnerImage:
    """`invoke images --runner`: build (or find) the runner image; mirror as the matrix says."""
    choice = check_base(base)
    matrix = load_matrix(matrix_path)
    return ensure_runner_image(
        connect(), resolve_mirror(matrix.mirror), default_cache_dir(), choice, log
    )
