"""Reference outputs of the graded checks: computed from the grader's own copy of the solution, or, in a student
release (which has no solution), read from the public checks' references that `make student` computed and shipped
in `grading/references/` (safetensors + JSON, as cs336's snapshot tests do). Hidden checks' references are only
ever computed in the instructor's tree and never written out."""

from __future__ import annotations

from pathlib import Path

from course.checks import Check, Values, load_checks
from course.tasks import TASKS
from course.worker import load_values, run_check, save_values

SHIPPED = Path("grading") / "references"
_COMPUTED: dict[tuple[str, str], Values] = {}  # one computation per grader process and check


def _stem(check: Check) -> str:
    return check.key.replace("/", "_").replace(".", "_")  # "1.1/public/3" -> "1_1_public_3"


def reference(check: Check, inputs: Values, root: Path) -> Values:
    """The solution's outputs on `inputs` (the same inputs the worker got)."""
    shipped = root / SHIPPED
    if shipped.is_dir():
        if check.hidden:
            raise RuntimeError(f"{check.key}: a hidden check in a tree with shipped references; hidden checks are "
                               "graded by the instructor's tree only")
        return load_values(shipped / _stem(check))
    cache_key = (str(root), check.key)
    if cache_key not in _COMPUTED:
        _COMPUTED[cache_key] = run_check(check.spec, inputs)
    return _COMPUTED[cache_key]


def write_public_references(root: Path, out: Path) -> int:
    """Compute the public checks' references with `root`'s solution into `out` (a release's grading/references);
    returns how many were written. Property checks need none."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for task in TASKS:
        for check in load_checks(root, task.id, hidden=False):
            if check.prop is None:
                save_values(run_check(check.spec, check.inputs()), out / _stem(check))
                count += 1
    return count
