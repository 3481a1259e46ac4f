#!/bin/bash
# Set up a Debian 12 (or newer) machine for kmatrix: the system packages, the virtualenv in
# .venv, and a Docker engine. Shared by the README and .ci/run.
#
# Works as root without sudo, as a user with sudo, and without systemd (containers, chroots):
# a Docker engine is started in the background when none answers. Packages already installed
# are not fetched again, so a second run needs no network.
#
# KMATRIX_REQUIRE_DOCKER=1 makes an engine that cannot be started an error (exit 2); otherwise
# it is a warning and the docker tests and cells are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    qemu-system-x86 qemu-system-arm gpgv gnupg procps debian-archive-keyring e2fsprogs cpio
    docker.io debootstrap python3 python3-venv python3-pip ca-certificates
)
DOCKERD_LOG=${TMPDIR:-/tmp}/kmatrix-dockerd.log

as_root() {
    # Root runs it directly (a fresh container has no sudo); anyone else needs sudo.
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "setup: '$*' needs root: run this script as root or install sudo" >&2
        exit 2
    fi
}

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' \
            || echo "$p"
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ "${#missing[@]}" = 0 ]; then
        echo "== system packages: all installed"
        return
    fi
    echo "== installing system packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
    echo "== installing kmatrix and its Python dependencies into .venv"
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
}

start_docker() {
    if docker info >/dev/null 2>&1; then
        echo "== Docker engine: answers"
        return 0
    fi
    echo "== starting a Docker engine"
    if [ -d /run/systemd/system ]; then
        as_root systemctl start docker || true
    else
        # No systemd (a container, WSL): dockerd in the background, its log kept.
        as_root sh -c "nohup dockerd >'$DOCKERD_LOG' 2>&1 &"
    fi
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && { echo "== Docker engine: started"; return 0; }
        sleep 1
    done
    echo "setup: no Docker engine answers (log: $DOCKERD_LOG):" >&2
    tail -5 "$DOCKERD_LOG" 2>/dev/null >&2 || true
    if [ "$(id -u)" != 0 ]; then
        # The engine may run while this user may not use its socket.
        echo "setup: if dockerd runs, add yourself to the docker group: sudo adduser $USER docker" >&2
    fi
    return 1
}

install_packages
install_venv
if ! start_docker; then
    if [ "${KMATRIX_REQUIRE_DOCKER:-}" = 1 ]; then
        exit 2
    fi
    echo "setup: continuing without Docker: docker cells and tests will be skipped" >&2
fi
echo "== done: activate with '. .venv/bin/activate'"
