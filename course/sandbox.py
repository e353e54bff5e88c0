"""Run the grader's worker on a submission inside a sandbox: bubblewrap (`bwrap`), or no sandbox when asked by name.

Under `bwrap` the worker sees a minimal root: /usr (read-only), the Python installation at its own path and the
environment's site-packages at /venv/site-packages (read-only; the editable install's finder of the grader's own
tree masked), the submission's code at /sub (read-only), its inputs at /io/in (read-only), its outputs at /io/out
(the only writable folder on disk), a small /tmp in memory, and nothing else: not the grader's tree, the hidden
checks, other submissions or the grader's environment variables (`--clearenv`). It has no network (new network
namespace), runs as an unprivileged user (nobody), in new PID, IPC and UTS namespaces and a new session, with
limits on address space, CPU time, processes and file size (`prlimit`). When the run ends or times out the whole
PID namespace is killed: every process the submission started, `setsid` children included.

As root the sandbox drops to the real uid of nobody inside bwrap (`setpriv`), so that the process limit counts the
sandbox's own processes; otherwise bwrap maps the caller to nobody in a user namespace and the process limit counts
the caller's processes too (it is raised by what the caller already runs).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from course import worker

MODES = ("bwrap", "none")
INSTALL = "sudo apt-get install bubblewrap"  # Debian/Ubuntu; the tool's package has this name on most systems
NOBODY = 65534
CODE_IN_SANDBOX = "/sub"  # where the worker sees the submission's code
SANDBOX_TMP_BYTES = 64 << 20
POLL_S = 0.2  # how often the grader looks at a running worker's time and output size


class SandboxUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 4 << 30  # address space per process (torch alone reserves about 1.5 GiB)
    processes: int = 64  # threads count as processes
    file_bytes: int = 64 << 20  # largest file the worker may write
    cpu_margin_s: int = 10  # CPU seconds past the task's wall-clock limit (the wall clock stops it first)
    output_bytes: int = 512 << 20  # all files in the output folder together (polled): the host's disk is shared


@dataclass
class Run:
    returncode: int | None  # None: stopped by the grader (see `stopped`)
    seconds: float
    log: str  # the worker's stdout and stderr, last part
    stopped: str = ""  # "time": at the time limit; "output": it wrote more than Limits.output_bytes


def check_available(mode: str) -> None:
    """Raise SandboxUnavailable naming the install command when `mode` cannot run here."""
    if mode not in MODES:
        raise SandboxUnavailable(f"unknown sandbox {mode!r}: use one of {', '.join(MODES)} (docker is not supported "
                                 "by this grader: bubblewrap gives the same isolation without a daemon)")
    if mode == "bwrap":
        missing = [tool for tool in ("bwrap", "prlimit") if shutil.which(tool) is None]
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            missing.append("setpriv")
        if missing:
            raise SandboxUnavailable(f"the sandbox needs {', '.join(missing)}, not found on PATH: install it with "
                                     f"`{INSTALL}` (setpriv and prlimit come with util-linux), or grade without a "
                                     "sandbox by naming it: --sandbox none")


def _editable_finders(site: Path) -> list[Path]:
    """The editable install's files, which name the grader's tree: masked in the sandbox."""
    return sorted([*site.glob("__editable__*"), *site.glob("_hw3_editable*"), *site.glob("hw3-*.dist-info/*")])


def bwrap_command(code: Path, io: Path, timeout: float, limits: Limits) -> list[str]:
    """The bwrap command line that runs the worker on `code` with `io`'s inputs (see the module docstring)."""
    prefix = Path(sys.base_prefix).resolve()
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    python = prefix / "bin" / Path(sys.executable).name
    if not python.exists():
        python = prefix / "bin" / "python3"
    command = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session", "--clearenv",
               "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
               "--setenv", "OMP_NUM_THREADS", "1", "--setenv", "MKL_NUM_THREADS", "1",
               "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--setenv", "PYTHONHASHSEED", "0",
               "--setenv", "HF_HUB_OFFLINE", "1", "--setenv", "TRANSFORMERS_OFFLINE", "1",
               "--setenv", "HW3_PROFILE", "smoke",
               "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
               "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
               "--size", str(SANDBOX_TMP_BYTES), "--perms", "1777", "--tmpfs", "/tmp",
               "--perms", "0755", "--dir", "/venv", "--perms", "0755", "--dir", "/io", "--perms", "0755", "--dir",
               "/grader"]
    # Python at its own path (its binary finds libpython there), each folder above it created world-readable
    for parent in reversed(prefix.parents[:-1]):
        command += ["--perms", "0755", "--dir", str(parent)]
    command += ["--ro-bind", str(prefix), str(prefix), "--ro-bind", str(site), "/venv/site-packages"]
    for path in ("/etc/ld.so.cache", "/etc/localtime"):
        if Path(path).exists():
            command += ["--ro-bind", path, path]
    for finder in _editable_finders(site):
        command += ["--ro-bind", "/dev/null", f"/venv/site-packages/{finder.relative_to(site)}"]
    command += ["--ro-bind", str(code), CODE_IN_SANDBOX, "--ro-bind", str(io / "in"), "/io/in",
                "--bind", str(io / "out"), "/io/out", "--ro-bind", str(Path(worker.__file__).resolve()),
                "/grader/worker.py", "--chdir", "/tmp"]
    if os.geteuid() == 0:  # drop to the real uid of nobody, so RLIMIT_NPROC counts the sandbox's processes only
        command += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--", "setpriv", f"--reuid={NOBODY}",
                    f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
        processes = limits.processes
    else:
        command += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--"]
        processes = limits.processes + _processes_of(os.getuid())
    command += ["prlimit", f"--as={limits.memory_bytes}", f"--nproc={processes}", f"--fsize={limits.file_bytes}",
                f"--cpu={int(timeout) + limits.cpu_margin_s}", "--core=0", "--",
                str(python), "-I", "-S", "-B", "-X", "faulthandler", "-c", worker.BOOTSTRAP, "/grader/worker.py",
                CODE_IN_SANDBOX, "/venv/site-packages", "/io"]
    return command


def _processes_of(uid: int) -> int:
    count = 0
    for entry in Path("/proc").iterdir():
        try:
            count += entry.name.isdigit() and entry.stat().st_uid == uid
        except OSError:
            continue
    return count


def direct_command(code: Path, io: Path) -> list[str]:
    """No sandbox (--sandbox none): the worker in a plain subprocess, with the grader's rights."""
    site = sysconfig.get_paths()["purelib"]
    return [sys.executable, "-I", "-S", "-B", "-X", "faulthandler", "-c", worker.BOOTSTRAP,
            str(Path(worker.__file__).resolve()), str(code), site, str(io)]


def run_worker(code: Path, io: Path, timeout: float, mode: str = "bwrap", limits: Limits | None = None) -> Run:
    """Run the worker on `code` with the inputs in `io`/in, writing `io`/out; kill everything at `timeout` s."""
    check_available(mode)
    limits = limits or Limits()
    out = io / "out"
    out.mkdir(parents=True, exist_ok=True)
    if mode == "bwrap" and os.geteuid() == 0:
        os.chown(out, NOBODY, NOBODY)
    if mode == "bwrap":
        command, env = bwrap_command(code, io, timeout, limits), {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    else:
        command = direct_command(code, io)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "OMP_NUM_THREADS": "1", "HW3_PROFILE": "smoke",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HOME": str(io)}
    log_path = io / "worker.log"
    start = time.perf_counter()
    code_, stopped = None, ""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=io, start_new_session=True)
        try:
            while not stopped:
                try:
                    code_ = proc.wait(POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    if _bytes_in(out) > limits.output_bytes:
                        stopped = "output"
                    elif time.perf_counter() - start > timeout:
                        stopped = "time"
        finally:  # bwrap's init dies with it (--die-with-parent), and with it the whole PID namespace
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    seconds = time.perf_counter() - start
    with log_path.open("rb") as log:
        log.seek(max(0, log_path.stat().st_size - 4000))
        text = log.read().decode(errors="replace")
    return Run(code_, seconds, text, stopped)


def _bytes_in(folder: Path) -> int:
    """Bytes of the files directly in `folder` (the worker writes no subfolders; a link counts as nothing)."""
    total = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return total
