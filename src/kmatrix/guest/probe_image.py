"""The probe container image: built FROM scratch from the guest userland, tagged by content.

The tag is a hash of everything that goes into the image (userland packages, probe files,
Dockerfile), so a changed probe or userland builds a new image and an unchanged one is
reused without talking to any registry.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import requests.exceptions

from kmatrix.artifacts import image_content_hash
from kmatrix.backends.docker import LABEL, connect
from kmatrix.config import load_matrix
from kmatrix.debian.archive import Archive, default_cache_dir, resolve_mirror
from kmatrix.errors import InfraError
from kmatrix.guest.userland import (
    IMAGES_DIR,
    Userland,
    build_userland,
    probe_files,
    userland_tarball,
)

DOCKERFILE = IMAGES_DIR / "probe" / "Dockerfile"
IMAGE_REPO = "kmatrix-probe"

#: Seconds a build may take (it copies ~40 MB; no network).
BUILD_TIMEOUT = 600


@dataclass(frozen=True)
class ProbeImage:
    """A probe image on the engine."""

    tag: str
    content_hash: str
    built: bool  # False when an image with this content hash already existed


def content_hash(userland_key: str, probe: dict[str, bytes], dockerfile: bytes) -> str:
    """Hash of every input of the image (pure): the tag changes exactly when they do."""
    return image_content_hash(("userland", userland_key), dockerfile, ("probe", probe))


def image_tag(digest: str) -> str:
    """``kmatrix-probe:<content hash>``."""
    return f"{IMAGE_REPO}:{digest}"


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tf.addfile(info, io.BytesIO(data))


def write_build_context(
    dest: Path,
    dockerfile: bytes,
    paths: Mapping[str, Path],
    files: Mapping[str, bytes],
    executables: Collection[str] = (),
) -> None:
    """A custom build context as a tar (this image's and the runner image's).

    The Dockerfile first, then ``paths`` (name in the context -> file on disk) in their
    order, then ``files`` (name -> content) sorted by name, mode 0644 or 0755 for the names
    in ``executables``.
    """
    with tarfile.open(dest, "w") as tf:
        _add_bytes(tf, "Dockerfile", dockerfile, 0o644)
        for name, path in paths.items():
            tf.add(path, arcname=name)
        for name, data in sorted(files.items()):
            _add_bytes(tf, name, data, 0o755 if name in executables else 0o644)


def write_context(
    dest: Path, userland_tar: Path, probe: dict[str, bytes], dockerfile: bytes
) -> None:
    """The build context as a tar: Dockerfile, userland.tar and probe/."""
    probe_files = {f"probe/{name}": data for name, data in probe.items()}
    write_build_context(dest, dockerfile, {"userland.tar": userland_tar}, probe_files)


def _image_exists(client: Any, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_probe_image(
    client: Any, userland: Userland, cache: Path, log: Callable[[str], None] = print
) -> ProbeImage:
    """The probe image for this userland and probe, built only when its tag is missing."""
    dockerfile = DOCKERFILE.read_bytes()
    probe = probe_files()
    digest = content_hash(userland.key, probe, dockerfile)
    tag = image_tag(digest)
    if _image_exists(client, tag):
        return ProbeImage(tag, digest, built=False)
    log(f"building docker image {tag}")
    userland_tar = userland_tarball(userland)
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=work, prefix="probe-context.", suffix=".tar") as ctx:
        write_context(Path(ctx.name), userland_tar, probe, dockerfile)
        ctx.seek(0)
        docker_build(client, ctx, tag, digest)
    return ProbeImage(tag, digest, built=True)


def docker_build(
    client: Any,
    context: Any,
    tag: str,
    digest: str,
    *,
    timeout: int = BUILD_TIMEOUT,
    buildargs: dict[str, str] | None = None,
    network_mode: str | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Build a custom context through the low-level API so engine errors arrive as text.

    Labelled so ``docker image prune --filter label=kmatrix`` finds every image we made;
    ``log`` receives each Dockerfile step as it starts.
    """
    api = client.api
    old_timeout, api.timeout = api.timeout, timeout
    try:
        stream = api.build(
            fileobj=context,
            custom_context=True,
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            buildargs=buildargs,
            network_mode=network_mode,
            labels={LABEL: "1", "kmatrix.content-hash": digest},
            decode=True,
        )
        for chunk in stream:
            if "error" in chunk:
                detail = json.dumps(chunk.get("errorDetail") or chunk["error"])
                raise InfraError(f"docker build of {tag} failed: {detail[-600:]}")
            line = str(chunk.get("stream", "")).strip()
            if log is not None and line.startswith("Step "):
                log(f"  {line[:120]}")
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise InfraError(
            f"docker build of {tag} failed ({str(exc)[:200]}); check `docker info`"
        ) from None
    finally:
        api.timeout = old_timeout


def build_images(matrix_path: Path, log: Callable[[str], None] = print) -> ProbeImage:
    """`invoke images`: build (or find) the probe image for the matrix's guest userland."""
    matrix = load_matrix(matrix_path)
    cache = default_cache_dir()
    archive = Archive(
        resolve_mirror(matrix.mirror),
        cache,
        keyring=matrix.keyring,
        check_valid_until=matrix.check_valid_until,
        log=log,
    )
    userland = build_userland(archive, matrix.guest.suite, cache, log)
    return ensure_probe_image(connect(), userland, cache, log)
