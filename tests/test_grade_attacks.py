"""The attack suite: submissions that try to get points without the work, or to reach past the grader's sandbox.

Each starts from a fresh student release and changes task 1.3 (`dpo_loss`), either in `fm/__init__.py` (code that
runs on import) or in `dpo_loss`'s body. Attacks that try to read or reach something the sandbox should hide fall
back to the solution's code when they succeed, so an open channel shows up as points. Each must get 0 points with
the reason in the report, leave nothing changed outside the sandbox and leave no process behind. One worker run per
attack (task 1.3 only); about 2-4 s each, the hang 6 s (its time limit), the disk filler about 7 s.
"""

import hashlib
import os
import socket
import sysconfig
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
from test_course import ROOT, paste, require_sandbox, submission_copy

from course.grade import grade, write_reports
from course.release import build_release, check_regions
from course.tasks import task_by_id

MARK = "987654"  # in the command line of every process an attack leaves running, so that survivors can be found
SITE = sysconfig.get_paths()["purelib"]
HOST_FILES = (f"{SITE}/hw3_attack.pth", f"{ROOT}/hw3_attack_marker", f"/tmp/hw3_attack_{MARK}",
              os.path.expanduser("~/hw3_attack_marker"))

INIT_ATTACKS = {  # name: code appended to fm/__init__.py
    "patch pytest's runner so that failures vanish": """
        try:
            import _pytest.reports as _reports
            _init = _reports.TestReport.__init__

            def _passing(self, *args, **kwargs):
                _init(self, *args, **kwargs)
                self.outcome, self.longrepr = "passed", None

            _reports.TestReport.__init__ = _passing
        except ImportError:
            pass
    """,
    "rewrite the JUnit report at exit": """
        import atexit, re, sys

        def _rewrite():
            for arg in sys.argv:
                if arg.startswith("--junitxml="):
                    path = arg.split("=", 1)[1]
                    text = re.sub(r"<(failure|error)[^>]*?(/>|>.*?</\\1>)", "", open(path).read(), flags=re.S)
                    open(path, "w").write(re.sub(r'(failures|errors)="\\d+"', r'\\1="0"', text))

        atexit.register(_rewrite)
    """,
    "write an all-pass JUnit report and exit before any test": """
        import os, sys
        for arg in sys.argv:
            if arg.startswith("--junitxml="):
                open(arg.split("=", 1)[1], "w").write('<testsuites><testsuite tests="0"/></testsuites>')
        os._exit(0)
    """,
    "point __path__ at the instructor's tree": """
        import importlib.metadata, json
        try:
            _url = json.loads(importlib.metadata.distribution("hw3").read_text("direct_url.json"))["url"]
            __path__.insert(0, _url.removeprefix("file://") + "/fm")
        except Exception:
            pass
        __path__.insert(0, "{root}/fm")
    """,
    "a detached process rewrites grade.json after the grader exits": """
        import subprocess, sys
        _forge = ("import json, sys, time\\nfor _ in range(600):\\n    time.sleep(0.05)\\n    try:\\n"
                  "        open(sys.argv[1], 'w').write(json.dumps({{'points': 100, 'max_points': 100}}))\\n"
                  "    except OSError:\\n        pass\\n")
        subprocess.Popen([sys.executable, "-c", _forge, "{out}/grade.json", "{mark}"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    """,
    "append a hook to the grader's graded tests": """
        for _path in ("{root}/grading/conftest.py", "{root}/grading/task_1_3.py"):
            try:
                open(_path, "a").write("\\n# appended by a submission\\n")
            except OSError:
                pass
    """,
    "write outside its tree and a .pth into the venv": """
        import os, sys
        _targets = [*{host_files}, *(os.path.join(p, "hw3_attack.pth") for p in sys.path if "site-packages" in p)]
        for _target in _targets:
            try:
                open(_target, "w").write("import os\\n")
            except OSError:
                pass
    """,
}

BODY_ATTACKS = {  # name: dpo_loss's body ({solution}: the solution's body, run when the attack's channel is open)
    "read the solution, the hidden checks, other submissions and the grader's environment": """
        import glob, os
        found = [p for p in ("{root}/fm/dpo.py", "{root}/grading/hidden/task_1_3.py") if os.path.exists(p)]
        found += [k for k in os.environ if k.startswith("HW3_ATTACK_SECRET")]
        found += glob.glob("/tmp/hw3-grade-*") + glob.glob("/tmp/pytest-of-*/*/*/submission")  # other submissions
        if not found:
            raise RuntimeError("nothing of the grader's could be read")
        {solution}
    """,
    "open a socket to the grader's machine": """
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
        {solution}
    """,
    "a memory hog (16 GiB, never touched)": """
        hog = bytearray(16 << 30)
        {solution}
    """,
    "a fork bomb (bounded at 200 forks)": """
        import os, time
        forks = 0
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execvp("sleep", ["sleep", "{mark}"])
            forks += 1
        raise RuntimeError(f"forked {{forks}} children before the process limit")
    """,
    "fill the grader's disk (bounded at 16 files of 64 MiB)": """
        import glob, os, time
        folders = [p for p in ("/io/out", *glob.glob("/tmp/hw3-grade-*/io/*/out")) if os.access(p, os.W_OK)]
        for index in range(16):
            with open(os.path.join(folders[0], f"fill{{index}}"), "wb") as fill:
                fill.write(b"x" * (64 << 20))
        time.sleep(3600)
    """,
    "a hang with a setsid child": """
        import subprocess, time
        subprocess.Popen(["setsid", "sleep", "{mark}"])
        time.sleep(3600)
    """,
}

REASONS = {  # what the report says for each attack (every other attack leaves the stubs: "Task 1.3: implement")
    "write an all-pass JUnit report and exit before any test": "the worker exited with code 0 during this check",
    "read the solution, the hidden checks, other submissions and the grader's environment":
        "nothing of the grader's could be read",
    "open a socket to the grader's machine": "ConnectionRefusedError",  # the sandbox has its own loopback only
    "a memory hog (16 GiB, never touched)": "MemoryError",
    "a fork bomb (bounded at 200 forks)": "children before the process limit",
    "a hang with a setsid child": "timed out",
    "fill the grader's disk (bounded at 16 files of 64 MiB)": "wrote more than 512 MiB of outputs",
    "directory symlinks to the instructor's packages": "is a symbolic link",
}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    require_sandbox()
    return build_release(tmp_path_factory.mktemp("dist") / "student", check_imports=False).out


@pytest.fixture(scope="module")
def listener():
    """A socket on the grader's machine that a sandboxed submission must not reach."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def _solution_body() -> str:
    region = next(r for r in check_regions(ROOT) if r.function == "dpo_loss")
    return textwrap.dedent("".join((ROOT / region.path).read_text().splitlines(keepends=True)[region.begin :
                                                                                                region.end - 1]))


def _fill(code: str, out: Path, port: int) -> str:
    code = textwrap.dedent(code)
    values = {"root": ROOT, "out": out, "mark": MARK, "port": port, "host_files": repr(HOST_FILES)}
    if "{solution}" in code:  # the solution's body at the placeholder's indentation
        line = next(x for x in code.splitlines() if x.strip() == "{solution}")
        values["solution"] = textwrap.indent(_solution_body(), line[: len(line) - len(line.lstrip())]).strip()
    return code.format(**values)


def _outside_state(submission: Path) -> dict[str, str]:
    """What an attack must not change: the grader's tree, the venv's top level, the submission, files it aims at."""
    state = {}
    for path in sorted([*(ROOT / "grading").rglob("*.py"), ROOT / "fm" / "dpo.py", ROOT / "fm" / "__init__.py",
                        *(p for p in submission.rglob("*") if p.is_file() and "__pycache__" not in p.parts)]):
        state[str(path)] = hashlib.sha1(path.read_bytes()).hexdigest()
    state["venv"] = ",".join(sorted(os.listdir(SITE)))
    state.update({path: str(os.path.exists(path)) for path in HOST_FILES})
    return state


def _survivors() -> list[str]:
    """Command lines of processes left by a sandboxed run: its worker, or what an attack started."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and int(entry.name) != os.getpid() and (MARK in command
                                                                         or "/grader/worker.py" in command):
            found.append(command)
    return found


def _attack(release: Path, tmp_path: Path, name: str, listener: socket.socket) -> Path:
    submission = submission_copy(release, tmp_path)
    out = tmp_path / "grade"
    port = listener.getsockname()[1]
    if name in INIT_ATTACKS:
        with (submission / "fm" / "__init__.py").open("a") as init:
            init.write("\n" + _fill(INIT_ATTACKS[name], out, port))
    elif name in BODY_ATTACKS:
        paste(submission, "1.3", {"dpo_loss": _fill(BODY_ATTACKS[name], out, port),
                                  "ipo_loss": 'raise NotImplementedError("Task 1.3: implement ipo_loss")\n'})
    else:  # directory symlinks to the instructor's packages
        for package in ("common", "fm", "gm"):
            os.rename(submission / package, tmp_path / f"{package}.orig")
            (submission / package).symlink_to(ROOT / package, target_is_directory=True)
    return submission


ATTACKS = [*INIT_ATTACKS, "directory symlinks to the instructor's packages", *BODY_ATTACKS]


@pytest.mark.slow
@pytest.mark.parametrize("name", ATTACKS)
def test_an_attack_gets_zero_points_changes_nothing_outside_and_leaves_no_process(release, tmp_path, listener,
                                                                                  monkeypatch, name):
    submission = _attack(release, tmp_path, name, listener)
    monkeypatch.setenv("HW3_ATTACK_SECRET", "the grader's environment")
    before = _outside_state(submission)
    timeout = 6 if "hang" in name else 60
    result = grade(submission, [replace(task_by_id("1.3"), timeout=timeout)])
    json_path, md_path = write_reports(result, tmp_path / "grade")
    (task,) = result.tasks
    assert result.points == 0 and task.points == 0, (name, [t.message for t in task.tests])
    report = json_path.read_text() + md_path.read_text()
    reason = REASONS.get(name, "Task 1.3: implement")
    assert reason in report, (name, report[-1500:])
    assert '"points": 0' in json_path.read_text()  # no detached process rewrote it
    assert _outside_state(submission) == before, name
    assert _survivors() == [], name
    with pytest.raises(BlockingIOError):  # nothing connected to the grader's machine
        listener.accept()
    if "fork bomb" in name:
        forks = int(report.split("forked ", 1)[1].split(" ", 1)[0])
        assert 0 < forks < 64, forks  # the process limit (64, threads included) stopped it
