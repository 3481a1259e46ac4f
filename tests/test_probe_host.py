"""The probe on this host: metric parsers on recorded /proc files, and real probe runs.

The integration tests run ``probes/probe.py`` with the current interpreter (as root, the
way it runs in the guest) and check accounting facts that could really fail.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PROBES = REPO / "probes"
PROBE = PROBES / "probe.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "proc"
MIB = 1 << 20
SIZE_MIB = 16
SIZE = SIZE_MIB * MIB

sys.path.insert(0, str(PROBES))

import accounting  # noqa: E402
import scenario_child  # noqa: E402
import scenario_types  # noqa: E402
import scenarios  # noqa: E402
import system  # noqa: E402

ALL = list(scenarios.SCENARIOS)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the probe runs as root")


def fixture(name: str) -> str:
    """Text of a recorded /proc or cgroup file."""
    return (FIXTURES / name).read_text()


# ---- parsers on recorded files ---------------------------------------------------------


def test_status_metrics_from_recorded_status() -> None:
    metrics = accounting.status_metrics(fixture("status"))
    assert metrics == {
        "VmRSS": 13576 * 1024,
        "RssAnon": 6880 * 1024,
        "RssFile": 6696 * 1024,
        "RssShmem": 0,
        "VmSwap": 0,
    }


def test_meminfo_metrics_from_recorded_meminfo() -> None:
    metrics = accounting.meminfo_metrics(fixture("meminfo"))
    assert metrics == {
        "meminfo_Shmem": 8856 * 1024,
        "meminfo_Cached": 507848 * 1024,
        "meminfo_MemAvailable": 24193168 * 1024,
        "meminfo_Committed_AS": 407888 * 1024,
        "meminfo_SwapCached": 0,
        "meminfo_SwapUsed": 0,  # SwapTotal - SwapFree
    }
    # Unit-less lines (HugePages_Total: 0) stay plain numbers.
    assert accounting.parse_kb_fields(fixture("meminfo"))["HugePages_Total"] == 0


def test_smaps_rollup_pss_and_header_line_skipped() -> None:
    assert accounting.smaps_rollup_metrics(fixture("smaps_rollup")) == {
        "Pss": 9500 * 1024,
        "smaps_Swap": 0,
    }
    assert accounting.smaps_rollup_metrics("") == {}


def test_cgroup_v1_memory_stat() -> None:
    metrics = accounting.cgroup_stat_metrics(fixture("memory.stat.v1"), "v1")
    assert metrics == {"cgroup_anon": 8835072, "cgroup_file": 31973376, "cgroup_shmem": 0}


def test_cgroup_v2_memory_stat_keys() -> None:
    # Synthetic (no v2 memory controller on the recording host): only the key mapping.
    text = "anon 4096\nfile 8192\nkernel 1\nshmem 12288\nfile_mapped 3\n"
    metrics = accounting.cgroup_stat_metrics(text, "v2")
    assert metrics == {"cgroup_anon": 4096, "cgroup_file": 8192, "cgroup_shmem": 12288}
    assert accounting.cgroup_stat_metrics(text, "none") == {}


def test_deltas_only_for_metrics_read_twice() -> None:
    before = {"VmRSS": 10, "Pss": 5, "oom_score": 666}
    after = {"VmRSS": 30, "oom_score": 667, "fs_used": 1}
    assert accounting.deltas(before, after) == {"VmRSS_delta": 20, "oom_score_delta": 1}


def test_mountinfo_lookup_and_unescape() -> None:
    mounts = system.parse_mountinfo(fixture("mountinfo"))
    shm = system.mount_of("/dev/shm/x", mounts)
    assert shm is not None and shm.fstype == "tmpfs"
    cg = system.mount_of("/sys/fs/cgroup/memory/a", mounts)
    assert cg is not None and cg.fstype == "cgroup" and "memory" in cg.super_options
    spaced = system.parse_mountinfo(r"50 27 0:40 / /mnt/a\040b rw - ext4 /dev/vdb rw")
    assert spaced[0].mount_point == "/mnt/a b"


def test_own_cgroup_path_and_resolution(tmp_path: Path) -> None:
    text = fixture("cgroup")
    assert system._own_cgroup_path("v1", text) == "/process_api/12fe4043cd43a96fafe71846246033d4"
    assert system._own_cgroup_path("v2", text) == "/"
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert system.resolve_cgroup_dir(str(tmp_path), "/", "/a/b") == str(tmp_path / "a" / "b")
    # A container without a cgroup namespace: the mount root is its own cgroup.
    assert system.resolve_cgroup_dir(str(tmp_path), "/docker/x", "/docker/x") == str(tmp_path)


# ---- the scenario child's protocol, in-process -----------------------------------------


def _crash_settings(tmp_path: Path) -> scenario_types.Settings:
    return scenario_types.Settings(MIB, 4096, str(tmp_path), str(tmp_path), None, "n/a")


def _run_fake(tmp_path: Path, act: Any, timeout: float = 30.0) -> dict[str, Any]:
    fake = scenario_types.Scenario("fake", act)
    none = system.Cgroups("none", "none", None, None)
    return scenario_child.run_scenario(fake, _crash_settings(tmp_path), none, timeout, 2)


def _raise_runtime(ctx: scenario_types.Ctx) -> None:
    raise RuntimeError("boom")


def _raise_enospc(ctx: scenario_types.Ctx) -> None:
    raise OSError(errno.ENOSPC, "full")


def _die(ctx: scenario_types.Ctx) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(ctx: scenario_types.Ctx) -> None:
    os.read(ctx.protocol_fds[0], 1)


def test_child_exception_becomes_error(tmp_path: Path) -> None:
    record = _run_fake(tmp_path, _raise_runtime)
    assert "RuntimeError: boom" in record["error"]
    assert record["errno"] is None and record["before"] and record["after"]


def test_child_oserror_becomes_errno(tmp_path: Path) -> None:
    record = _run_fake(tmp_path, _raise_enospc)
    assert record["errno"] == "ENOSPC" and record["error"] is None


def test_child_killed_and_hung_children_are_recorded(tmp_path: Path) -> None:
    died = _run_fake(tmp_path, _die)
    assert died["error"] == "child exited before sending result"
    hung = _run_fake(tmp_path, _hang, timeout=1.0)
    assert hung["error"] == "timeout waiting for result"
    assert "leftover_pids" not in hung["detail"]


# ---- the real probe on this host -------------------------------------------------------


def run_probe(*args: str, out: Path, prefix: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the probe, check its exit status, return the parsed records."""
    cmd = [*(prefix or []), sys.executable, str(PROBE), "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = []
    for line in out.read_text().splitlines():
        assert line.startswith("KMX1 "), line
        payload, _, crc = line[5:].rpartition(" ")
        assert zlib.crc32(payload.encode()) == int(crc, 16), line
        records.append(json.loads(payload))
    return records


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if entry.isdigit() and text.encode() in cmdline:
            pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def disk_dir() -> Iterator[str]:
    """A directory on the disk holding the repository (/work is on a real disk here)."""
    path = tempfile.mkdtemp(prefix=".kmx-disk-", dir=REPO)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def host_run(disk_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """All scenarios once, 16 MiB, /dev/shm and the disk directory."""
    if os.geteuid() != 0:
        pytest.skip("the probe runs as root")
    out = tmp_path_factory.mktemp("probe") / "records.kmx"
    args = ["--size-mib", str(SIZE_MIB), "--shm-dir", "/dev/shm", "--disk-dir", disk_dir]
    records = run_probe(*args, "--scenarios", "all", out=out)
    by_name = {r["name"]: r for r in records if r["type"] == "scenario"}
    return {"records": records, "by_name": by_name, "out": out}


def metric(run: dict[str, Any], name: str, key: str) -> int:
    value: int = run["by_name"][name]["metrics"][f"{key}_delta"]
    return value


def test_stream_has_hello_every_scenario_and_done(host_run: dict[str, Any]) -> None:
    records = host_run["records"]
    hello, done = records[0], records[-1]
    assert hello["type"] == "hello" and hello["probe_version"] == 1
    assert hello["release"] == os.uname().release and hello["page_size"] == os.sysconf(
        "SC_PAGE_SIZE"
    )
    assert hello["cgroup"] in ("v1", "v2", "none") and hello["python"].startswith("3.")
    with open("/proc/cmdline") as f:
        assert hello["cmdline"] == f.read().strip()
    assert done == {"type": "done", "scenarios": len(ALL)}
    assert [r["name"] for r in records[1:-1]] == ALL
    keys = {
        "type",
        "name",
        "size_bytes",
        "metrics",
        "before",
        "after",
        "errno",
        "error",
        "detail",
        "duration_s",
        "repeat",
    }
    assert all(set(r) == keys for r in records[1:-1])
    assert {r["repeat"] for r in records[1:-1]} == {0}


def test_on_the_host_kernel_the_hello_leaves_the_boot_line_out(tmp_path: Path) -> None:
    records = run_probe("--scenarios", "", "--host-kernel", out=tmp_path / "records.kmx")
    assert records[0]["type"] == "hello" and "cmdline" not in records[0]
    assert "knobs" in records[0]  # the rest of the hello is still there


@needs_root
def test_repeats_are_whole_passes(tmp_path: Path) -> None:
    out = tmp_path / "records.kmx"
    args = ["--size-mib", "4", "--scenarios", "memfd-write,anon-private", "--repeats", "3"]
    records = run_probe(*args, "--disk-dir", str(tmp_path), out=out)
    runs = [(r["name"], r["repeat"]) for r in records if r["type"] == "scenario"]
    assert runs == [(n, i) for i in range(3) for n in ("anon-private", "memfd-write")]
    assert records[-1] == {"type": "done", "scenarios": 6}


def test_runs_without_errors_except_refusals(host_run: dict[str, Any]) -> None:
    for name, record in host_run["by_name"].items():
        if (name.endswith("-over-shm-limit") or "beyond-half" in name) and record["error"]:
            # /dev/shm larger than the probe may fill (it refuses rather than exhaust RAM);
            # more RAM than a test guest has
            assert record["error"].startswith("refused"), record
            continue
        if name.endswith("-swapped") and record["error"]:
            assert record["error"].startswith("no swap device"), record  # not given one
            continue
        assert record["error"] is None, record
        if name == "tmpfile-over-shm-limit":
            # It ran, so /dev/shm had a limit the probe could exceed: O_TMPFILE on tmpfs must
            # stop at it (memfd-over-shm-limit, on the kernel's internal mount, must not).
            assert record["errno"] == "ENOSPC", record
        elif name not in ("memfd-hugetlb", "memfd-noexec-seal", "memfd-hugetlb-noexec-seal"):
            assert record["errno"] is None, record


def test_memfd_write_is_shmem_but_not_rss(host_run: dict[str, Any]) -> None:
    assert metric(host_run, "memfd-write", "VmRSS") < MIB
    assert metric(host_run, "memfd-write", "RssShmem") < MIB
    assert metric(host_run, "memfd-write", "meminfo_Shmem") >= 0.9 * SIZE
    if host_run["records"][0]["cgroup_mode"] == "per-scenario":
        assert metric(host_run, "memfd-write", "cgroup_shmem") >= 0.9 * SIZE
        assert metric(host_run, "memfd-write", "cgroup_current") >= 0.9 * SIZE


def test_memfd_mmap_counts_as_rss_shmem(host_run: dict[str, Any]) -> None:
    assert metric(host_run, "memfd-mmap", "RssShmem") >= 0.9 * SIZE
    assert metric(host_run, "memfd-mmap", "RssAnon") < MIB
    assert metric(host_run, "memfd-munmap", "RssShmem") < MIB
    assert metric(host_run, "memfd-munmap", "meminfo_Shmem") >= 0.9 * SIZE


def test_anon_private_is_anon_and_anon_shared_is_shmem(host_run: dict[str, Any]) -> None:
    assert metric(host_run, "anon-private", "RssAnon") >= 0.9 * SIZE
    assert metric(host_run, "anon-private", "RssShmem") < MIB
    assert metric(host_run, "anon-shared", "RssShmem") >= 0.9 * SIZE
    assert metric(host_run, "anon-shared", "RssAnon") < MIB


def test_memfd_2proc_pss_is_half(host_run: dict[str, Any]) -> None:
    pss = metric(host_run, "memfd-2proc", "Pss")
    assert 0.4 * SIZE <= pss <= 0.6 * SIZE
    grandchild = host_run["by_name"]["memfd-2proc"]["detail"]["grandchild"]
    assert grandchild["RssShmem"] >= 0.9 * SIZE


def test_disk_tmpfile_is_page_cache_not_shmem(host_run: dict[str, Any], disk_dir: str) -> None:
    record = host_run["by_name"]["tmpfile-disk-write"]
    if system.disk_problem(disk_dir):
        assert record["error"] == "no disk"
        pytest.skip(f"not a disk here: {system.disk_problem(disk_dir)}")
    assert metric(host_run, "tmpfile-disk-write", "meminfo_Shmem") < 0.5 * SIZE
    assert metric(host_run, "tmpfile-disk-write", "meminfo_Cached") >= 0.9 * SIZE
    assert metric(host_run, "tmpfile-disk-mmap", "RssFile") >= 0.9 * SIZE


def test_no_leftovers(host_run: dict[str, Any]) -> None:
    assert processes_mentioning(str(host_run["out"])) == []
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("kmatrix-")]
    for record in host_run["records"][1:-1]:
        assert "leftover_pids" not in record["detail"]
        assert "cgroup_cleanup_error" not in record["detail"]
        path = record["detail"].get("cgroup", {}).get("path")
        if record["detail"].get("cgroup", {}).get("mode") == "per-scenario":
            assert not os.path.exists(path)


def test_feature_probes_report_steps(host_run: dict[str, Any]) -> None:
    huge = host_run["by_name"]["memfd-hugetlb"]
    assert "memfd_create" in huge["detail"]
    assert (huge["errno"] is None) == (huge["detail"].get("touch") == "ok")
    seal = host_run["by_name"]["memfd-noexec-seal"]
    if seal["errno"] is None:
        assert seal["detail"]["fchmod_755"] in ("ok", "EPERM")


def mount_namespace_unavailable() -> str:
    """Why a private mount namespace with a tmpfs cannot be had here ('' when it can).

    Found by trying, not guessed from uid or capabilities: an unprivileged container is root
    but lacks CAP_SYS_ADMIN, and seccomp or user-namespace rules differ between engines.
    """
    if shutil.which("unshare") is None:
        return "unshare(1) not available"
    with tempfile.TemporaryDirectory() as mnt:
        argv = ["unshare", "--mount", "--propagation", "private"]
        argv += ["mount", "-t", "tmpfs", "-o", "size=1m", "kmx-try", mnt]
        tried = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if tried.returncode != 0:
        error = (tried.stderr.strip().splitlines() or ["no message"])[-1]
        return f"no private mount namespace with a tmpfs here (needs CAP_SYS_ADMIN): {error}"
    return ""


@needs_root
def test_over_shm_limit_on_a_small_tmpfs(tmp_path: Path) -> None:
    """memfd ignores a tmpfs size=; O_TMPFILE on it hits ENOSPC (private mount ns)."""
    reason = mount_namespace_unavailable()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "shm"
    mnt.mkdir()
    script = f'mount -t tmpfs -o size=32m kmx-test "{mnt}" && exec "$0" "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    names = "memfd-over-shm-limit,tmpfile-over-shm-limit"
    out = tmp_path / "records.kmx"
    args = ["--size-mib", "4", "--shm-dir", str(mnt), "--scenarios", names]
    records = run_probe(*args, out=out, prefix=prefix)
    assert records[0]["shm_size"] == 32 * MIB
    memfd, tmpfile = records[1], records[2]
    assert memfd["size_bytes"] == tmpfile["size_bytes"] == 64 * MIB
    assert memfd["errno"] is None and memfd["error"] is None
    assert memfd["metrics"]["meminfo_Shmem_delta"] >= 0.9 * 64 * MIB
    assert tmpfile["errno"] == "ENOSPC" and tmpfile["error"] is None
    written = tmpfile["detail"]["bytes_written"]
    assert 0.9 * 32 * MIB <= written <= 32 * MIB
    assert tmpfile["metrics"]["meminfo_Shmem_delta"] >= 0.8 * written


def test_list_and_unknown_scenario() -> None:
    listed = subprocess.run(
        [sys.executable, str(PROBE), "--list"], capture_output=True, text=True, check=True
    )
    names = listed.stdout.split()
    # The accounting scenarios, then the OOM experiments (probes/oom.py) in run order.
    assert names[: len(ALL)] == ALL
    assert names[len(ALL)] == "oom-memcg-v1" and names[-1] == "oom-no-killable"
    bad = subprocess.run(
        [sys.executable, str(PROBE), "--scenarios", "anon-private,nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "nope" in bad.stderr and "memfd-noexec-seal" in bad.stderr


KILL_GROUP = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import probe, scenario_child, system
assert probe.become_subreaper()
r, w = os.pipe()
child = os.fork()
if child == 0:  # a scenario child with a helper of its own, as memfd-2proc has
    os.setpgid(0, 0)
    if os.fork() == 0:
        os.write(w, b"x")
        time.sleep(60)
    time.sleep(60)
os.setpgid(child, child)
os.read(r, 1)  # the helper runs
scan = system.pids_in_group
def refused(pgid):
    raise AssertionError("a subreaper needs no /proc scan")
system.pids_in_group = refused
left = scenario_child.kill_group(child, subreaper=True)
print(left, scan(child))
"""


def test_a_subreaper_reaps_the_whole_group_without_scanning_proc() -> None:
    """kill_group as a subreaper: the helper is reparented to the probe when the scenario
    child dies (kernel/exit.c find_new_reaper), so waitpid(-pgid) reaps it too and nothing
    of the group is left in /proc, not even a zombie."""
    done = subprocess.run(
        [sys.executable, "-c", KILL_GROUP, str(PROBES)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "[]"]


def test_the_cgroup2_options_are_those_of_the_probe_s_cgroup_root() -> None:
    """mountinfo's super options of a cgroup2 mount at the root; None where the root is no
    cgroup2 mount (a v1 host's tmpfs) or not a mount of its own. Lines as this host's
    /proc/self/mountinfo has them (its cgroup2 is at /sys/fs/cgroup/unified)."""
    import knobs

    mounts = system.parse_mountinfo(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
        "31 26 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec - tmpfs tmpfs ro,mode=755\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,favordynmods\n"
    )
    assert knobs.cgroup2_options("/sys/fs/cgroup/unified", mounts) == "rw,favordynmods"
    assert knobs.cgroup2_options("/sys/fs/cgroup", mounts) is None
