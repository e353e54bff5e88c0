"""What a class grading (`course.grade_all`) reports: one `Row` per submission, `OUT/gradebook.csv`
(`write_gradebook`), `OUT/summary.md` (`summary`: per task the mean, median and histogram of the points, the most
frequent first failures, the submissions that failed to grade) and Gradescope's results.json of one submission's
grade.json (`gradescope_results`)."""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from course.tasks import Task

STATUSES = ("graded", "timeout", "crashed", "refused", "error")


@dataclass
class Row:
    """One submission's line of the gradebook, also kept as its `OUT/<id>/batch.json`."""

    id: str
    status: str  # one of STATUSES
    seconds: float
    points: dict[str, float] = field(default_factory=dict)  # task id -> points
    reason: str = ""
    digest: str = ""
    skipped: bool = False  # unchanged since the last run: read back from OUT

    @property
    def total(self) -> float:
        return round(sum(self.points.values()), 2)


def gradescope_results(report: dict) -> dict:
    """A grade.json as Gradescope's autograder results.json: `score`, and one test per task with `name`, `score`,
    `max_score`, `status` and `output` (its failed checks)."""
    tests = []
    for number, task in enumerate(report["tasks"], start=1):
        failed = [f"- {t['id']} ({t['outcome']}): {t['message']}" for t in task["tests"] if t["outcome"] != "passed"]
        output = "\n".join(([task["note"]] if task["note"] else []) + failed) or "all checks passed"
        tests.append({"name": f"{task['id']} {task['title']}", "number": str(number), "score": task["points"],
                      "max_score": task["max_points"], "status": "passed" if task["points"] == task["max_points"]
                      else "failed", "output": output, "visibility": "visible"})
    checks = "public and hidden checks" if report.get("hidden_tests") else "public checks only"
    return {"score": report["points"], "execution_time": report.get("seconds", 0), "output":
            f"{report['points']:g} / {report['max_points']} points ({checks}); the report is graded by hand.",
            "visibility": "visible", "stdout_visibility": "hidden", "tests": tests}


def write_gradebook(rows: list[Row], tasks: list[Task], path: Path) -> None:
    """One row per submission: id, each task's points, total, status, seconds, reason."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", *(t.id for t in tasks), "total", "status", "seconds", "reason"])
        for row in rows:
            writer.writerow([row.id, *(f"{row.points.get(t.id, 0.0):g}" for t in tasks), f"{row.total:g}",
                             row.status, f"{row.seconds:.1f}", row.reason])
    os.replace(tmp, path)


HISTOGRAM_BINS = ("0", "< 25 %", "25-50 %", "50-75 %", "75-100 %", "full")


def _bin(points: float, max_points: int) -> str:
    if points <= 0:
        return HISTOGRAM_BINS[0]
    if points >= max_points:
        return HISTOGRAM_BINS[-1]
    return HISTOGRAM_BINS[1 + min(3, int(4 * points / max_points))]


def first_failure(task: dict) -> str | None:
    """What a task's report fails on first: the note of a task that did not run through, else its first failed
    check; None when it passed."""
    if task["status"] != "graded":
        return task["status"]
    failed = [t["id"] for t in task["tests"] if t["outcome"] != "passed"]
    return failed[0] if failed else None


def summary(rows: list[Row], tasks: list[Task], out: Path, top: int = 3) -> str:
    """summary.md: per task mean, median and histogram of the points, its most frequent first failures; the totals;
    the submissions that failed to grade."""
    graded = [r for r in rows if r.status not in ("refused", "error")]
    lines = ["# Class summary", "",
             f"{len(rows)} submissions, {len(graded)} graded ({sum(r.status == 'graded' for r in rows)} without a "
             f"timeout or crash); {sum(r.skipped for r in rows)} unchanged since the last run.", "",
             "| task | max | mean | median | " + " | ".join(HISTOGRAM_BINS) + " |",
             "|---|---|---|---|" + "---|" * len(HISTOGRAM_BINS)]
    for task in [*tasks, None]:
        values = [r.points.get(task.id, 0.0) if task else r.total for r in rows]
        maximum = task.points if task else sum(t.points for t in tasks)
        counts = Counter(_bin(v, maximum) for v in values)
        name = f"{task.id} {task.title}" if task else "**total**"
        mean, median = (statistics.mean(values), statistics.median(values)) if values else (0.0, 0.0)
        lines.append(f"| {name} | {maximum} | {mean:.1f} | {median:.1f} | "
                     + " | ".join(str(counts[b]) for b in HISTOGRAM_BINS) + " |")
    lines += ["", "Histogram columns: how many submissions got that share of the task's points (refused and failed "
              "gradings count as 0).", "", "## Most frequent first failures", ""]
    firsts: dict[str, Counter] = {t.id: Counter() for t in tasks}
    for row in graded:
        try:
            report = json.loads((out / row.id / "grade.json").read_text())
        except (OSError, ValueError):
            continue
        for task in report["tasks"]:
            failure = first_failure(task)
            if failure and task["id"] in firsts:
                firsts[task["id"]][failure] += 1
    for task in tasks:
        common = firsts[task.id].most_common(top)
        text = "; ".join(f"{name} ({count})" for name, count in common) if common else "none"
        lines.append(f"- **{task.id}**: {text}")
    failed = [r for r in rows if r.status != "graded"]
    lines += ["", "## Submissions that failed to grade", ""]
    lines += [f"- `{r.id}`: {r.status}: {r.reason}" for r in failed] or ["none"]
    return "\n".join(lines) + "\n"
