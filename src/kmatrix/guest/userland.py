"""The guest image: a Debian userland (built once, cached) plus a small per-cell archive.

The initrd QEMU boots is two newc archives back to back, which the kernel's unpacker
accepts: the shared userland (busybox, Python) and a cell part (init, probe, the kernel's
own modules, the cell's parameters). Only the small cell part is rebuilt per cell.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import py_compile
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kmatrix.artifacts import (
    CacheCorrupted,
    file_digest,
    tree_problem,
    write_file_digest,
    write_manifest,
)
from kmatrix.debian.archive import Archive
from kmatrix.debian.debfile import extract_deb
from kmatrix.errors import UserError
from kmatrix.guest.cpio import CpioWriter
from kmatrix.guest.kmods import Module
from kmatrix.resources import data_root
from kmatrix.results.schema import atomic_write_bytes

#: The checkout's root, or the package data of an installed kmatrix (see kmatrix.resources).
ROOT = data_root()
IMAGES_DIR = ROOT / "images"
PROBES_DIR = ROOT / "probes"
PACKAGES_FILE = IMAGES_DIR / "guest" / "packages.txt"
INIT_FILE = IMAGES_DIR / "guest" / "init"

# Bump when the pruning below changes, so cached userlands are rebuilt.
USERLAND_LAYOUT = 4  # 3: no stdlib packages or extensions the probe never imports; 4: urllib back

# Parts of the packages the probe never needs. Every byte of the initrd sits in guest RAM
# (rootfs) for the whole run, and every byte is unpacked at every boot: the 38 MiB of
# layout 2 came down to 22 MiB, which leaves the OOM boots' experiments the same room
# in less guest RAM (less memory to fill before each OOM under TCG).
_PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/info",
    # glibc's iconv charset modules (Python has its own codecs): 8 MiB amd64, 20 MiB arm64.
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/lib/aarch64-linux-gnu/gconv",
    *(
        f"usr/lib/python3.11/{package}"
        for package in (
            "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data",
            "distutils", "config-3.11-x86_64-linux-gnu", "config-3.11-aarch64-linux-gnu",
            # Stdlib packages no probe module imports (the probe's own imports are listed by
            # _IMPORTS_SCRIPT, and tests/test_userland_prune.py checks none is pruned;
            # top-level modules and urllib, which pathlib needs, stay for lazy imports).
            "asyncio", "email", "xml", "xmlrpc", "multiprocessing", "unittest", "http",
            "html", "concurrent", "wsgiref", "venv", "zoneinfo", "tomllib", "dbm",
            "curses", "sqlite3", "__phello__",
        )
    ),
)  # fmt: skip

#: Extension modules (lib-dynload) no probe module loads: CJK codecs, test modules, and
#: bindings to libraries the guest does not have (OpenSSL, SQLite, ncurses, readline).
_PRUNE_EXTENSIONS = re.compile(
    r"^(_test\w*|_codecs_\w+|_multibytecodec|_ssl|_hashlib|_sqlite3|_curses\w*|_dbm|_decimal"
    r"|audioop|ossaudiodev|nis|readline|xxlimited\w*|_xxtestfuzz|_ctypes_test|_lsprof|_crypt"
    r"|_xxsubinterpreters|_asyncio|_zoneinfo|_bz2|_lzma)\.cpython-"
)


def prune(tree: Path) -> None:
    """Remove what the probe never uses from an extracted userland tree."""
    for rel in _PRUNE:
        shutil.rmtree(tree / rel, ignore_errors=True)
    for ext in (tree / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        if _PRUNE_EXTENSIONS.match(ext.name):
            ext.unlink()


def read_package_list(path: Path = PACKAGES_FILE) -> list[str]:
    """Package names from a package list file (``#`` starts a comment)."""
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


@dataclass(frozen=True)
class Userland:
    """A built guest userland: the extracted tree and its newc archive."""

    key: str
    tree: Path
    cpio: Path
    packages: dict[str, str]
    cpio_sha256: str = ""  # recorded when the archive was made; checked at every initrd


def build_userland(
    archive: Archive, suite: str, cache: Path, log: Callable[[str], None] = print
) -> Userland:
    """Fetch, verify and unpack the guest packages of ``suite``; cached by their SHA256s.

    The architecture is the archive's (``archive.arch``): the same package list, per arch.
    """
    names = read_package_list()
    records = archive.lookup(
        suite, "userland " + " ".join(names), lambda index: [index.get(n) for n in names]
    )
    # Other architectures name theirs in the key; amd64 keeps the key it always had, so
    # existing caches (and the probe image tagged by it) stay valid.
    arch = "" if archive.arch == "amd64" else f"{archive.arch}\n"
    key_src = f"{USERLAND_LAYOUT}\n{arch}" + "\n".join(sorted(r.sha256 for r in records))
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    base = cache / "userland" / key
    tree, cpio = base / "root", base / "userland.cpio"
    packages = {r.name: r.version for r in records}
    # Used only if both the archive and the tree still match what was recorded when built.
    digest = file_digest(cpio)
    if digest is not None and tree_problem(tree) is None:
        return Userland(key, tree, cpio, packages, digest)
    if cpio.exists():
        log(f"guest userland {key} in the cache does not match its digests; rebuilding it")
    log(f"building guest userland from {suite}/{archive.arch} ({len(records)} packages)")
    debs = archive.fetch_all(records)
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for deb in debs:
        extract_deb(deb, tree)
    prune(tree)
    precompile_probe_imports(tree)
    python = tree / "usr/bin/python3"
    if not python.exists():
        python.symlink_to("python3.11")
    if not (tree / "bin/busybox").exists():
        raise UserError(f"{PACKAGES_FILE}: the guest needs busybox-static (no /bin/busybox)")
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    writer.add_tree(tree)
    writer.finish()
    write_manifest(tree)
    atomic_write_bytes(cpio, buf.getvalue())
    return Userland(key, tree, cpio, packages, write_file_digest(cpio))


#: Lists the stdlib files the probe imports (run with the host's Python 3.11).
_IMPORTS_SCRIPT = """
import sys, sysconfig
sys.path.insert(0, sys.argv[1])
import ctypes, probe  # probe imports every probe module; ctypes is imported lazily
stdlib = sysconfig.get_paths()["stdlib"] + "/"
for mod in list(sys.modules.values()):
    path = getattr(mod, "__file__", None) or ""
    if path.startswith(stdlib) and path.endswith(".py"):
        print(path[len(stdlib):])
"""


def precompile_probe_imports(tree: Path) -> int:
    """Ship .pyc files for the stdlib modules the probe imports; returns how many.

    Debian's packages carry only .py sources (postinst compiles them), so each guest
    would compile ~100 modules at every probe start: about 5 s per boot under TCG.
    Compiling only what the probe imports adds ~1 MiB to the in-RAM rootfs instead of the
    ~10 MiB of the whole stdlib. Unchecked-hash pycs are valid whatever the file mtimes.
    Skipped (0) unless the host runs Python 3.11, the guest's version.
    """
    if sys.version_info[:2] != (3, 11):
        return 0
    run = subprocess.run(
        [sys.executable, "-I", "-c", _IMPORTS_SCRIPT, str(PROBES_DIR)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    count = 0
    for rel in run.stdout.split():
        source = tree / "usr/lib/python3.11" / rel
        if source.is_file():
            py_compile.compile(
                str(source),
                cfile=importlib.util.cache_from_source(str(source)),
                dfile=f"/usr/lib/python3.11/{rel}",
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )
            count += 1
    return count


#: Empty directories the container root needs (the engine mounts /proc, /sys, /dev over
#: them) and that the packages do not ship.
_ROOT_DIRS = ("proc", "sys", "dev", "tmp", "run", "mnt", "mnt/disk")


def _tar_entry(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owned by root and without host user names, whoever built the tree."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def userland_tarball(userland: Userland) -> Path:
    """The userland tree as a tar (cached next to its cpio): the root of the probe image.

    The same files as the initramfs, so VM and container cells run the same interpreter.
    """
    dest = userland.cpio.with_name("userland.tar")
    if file_digest(dest) is not None:
        return dest
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in _ROOT_DIRS:
            info = _tar_entry(tarfile.TarInfo(d))
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tf.addfile(info)
        if not (userland.tree / "bin" / "sh").exists():
            link = _tar_entry(tarfile.TarInfo("bin/sh"))
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tf.addfile(link)
        for path in sorted(userland.tree.iterdir()):
            tf.add(path, arcname=path.name, filter=_tar_entry)
    atomic_write_bytes(dest, buf.getvalue())
    write_file_digest(dest)
    return dest


def probe_files() -> dict[str, bytes]:
    """The probe sources shipped into every guest and container, by relative path."""
    return {
        str(p.relative_to(PROBES_DIR)): p.read_bytes()
        for p in sorted(PROBES_DIR.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def probe_sha256() -> str:
    """One hash over every probe file, recorded in results so runs can be compared."""
    h = hashlib.sha256()
    for name, data in probe_files().items():
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def probe_pycs() -> dict[str, bytes]:
    """Unchecked-hash .pyc files of the probe modules (host Python 3.11 only, else none).

    Each guest boot would otherwise compile the probe's ~2000 lines at start: about a
    second under TCG, paid by every boot (and a cell has several).
    """
    if sys.version_info[:2] != (3, 11):
        return {}
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in probe_files().items():
            if "/" in name or not name.endswith(".py"):
                continue
            src = Path(tmp) / name
            src.write_bytes(data)
            pyc = Path(tmp) / (name + "c")
            py_compile.compile(
                str(src), cfile=str(pyc), dfile=f"/probe/{name}",
                invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )  # fmt: skip
            out[f"__pycache__/{name[:-3]}.cpython-311.pyc"] = pyc.read_bytes()
    return out


def cell_archive(args: dict[str, str], modules: list[Module]) -> bytes:
    """The per-cell newc archive: /init, /probe, /modules and /kmatrix/args."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in ("proc", "sys", "dev", "tmp", "mnt", "run", "bin", "sbin", "usr/bin", "usr/sbin"):
        w.add_dir(d)
    w.add_symlink("bin/sh", "busybox")
    w.add_file("init", INIT_FILE.read_bytes(), 0o755)
    for name, data in probe_files().items():
        w.add_file(f"probe/{name}", data)
    for name, data in probe_pycs().items():
        w.add_file(f"probe/{name}", data)
    w.add_dir("modules")
    # Zero-padded prefixes keep `ls /modules` in dependency order.
    for i, mod in enumerate(modules):
        w.add_file(f"modules/{i:02d}-{mod.name}.ko", mod.data)
    text = "".join(f"{k}='{v}'\n" for k, v in sorted(args.items()))
    w.add_file("kmatrix/args", text.encode())
    w.finish()
    return buf.getvalue()


def write_initrd(userland: Userland, cell_part: bytes, dest: Path) -> None:
    """Concatenate the userland and cell archives into the initrd QEMU loads.

    The userland archive is hashed as it is copied: one changed since build_userland
    checked it is refused (CacheCorrupted; the next run rebuilds it), never booted.
    """
    h = hashlib.sha256()
    with dest.open("wb") as out, userland.cpio.open("rb") as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            out.write(chunk)
        out.write(cell_part)
    if userland.cpio_sha256 and h.hexdigest() != userland.cpio_sha256:
        dest.unlink(missing_ok=True)
        userland.cpio.with_name(userland.cpio.name + ".sha256").unlink(missing_ok=True)
        raise CacheCorrupted(
            f"{userland.cpio} changed after it was checked; run again to rebuild it"
        )
