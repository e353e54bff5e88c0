"""Graded checks as data: what the grader sends a submission's worker, and how it judges what comes back.

A `Check` names its task, builds its inputs in the grader (`inputs()`: tensors and JSON values), tells the worker
what to call (`spec`: an adapter of `course.worker` with its arguments) and judges the outputs in the grader:

- `close` (the default): every output the solution gives must come back with the same shape and dtype and within
  `atol` + `rtol` * |expected| (the message gives the largest absolute error and where); plain values must be
  equal (floats to the same tolerance);
- `prop`: a function of (inputs, outputs) that returns why the outputs fail, or None: for random outputs (samples,
  noise), judged by their statistics rather than by equality.

A check of a task whose tensor output equals one of its inputs unchanged, where the solution's does not, is a
stub: the task gets 0 points whatever else passes. Public checks live in `grading/task_<id>.py`, hidden ones in
`grading/hidden/task_<id>.py` (kept out of the student release); each module has `CHECKS: list[Check]`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

Values = dict[str, Any]
Property = Callable[[Values, Values], "str | None"]


@dataclass(frozen=True)
class Check:
    name: str  # what it checks, shown in the report (a hidden check's name says which property failed)
    spec: dict  # the worker's instructions: {"adapter": "call", "function": "fm.dpo.dpo_loss", "args": [...]}
    inputs: Callable[[], Values] = dict  # built in the grader, seeded
    atol: float = 1e-5
    rtol: float = 1e-5
    prop: Property | None = None  # judges random outputs instead of comparing with the solution's
    hint: str = ""  # added to a failure's message: what the homework's code needs from the function
    hidden: bool = False
    task: str = ""  # set by `load_checks`
    key: str = field(default="", compare=False)  # "1.1/public/3": where its reference is stored

    def label(self) -> str:
        return f"{'hidden: ' if self.hidden else ''}{self.name}"


def call(function: str, *args: Any, init: dict | None = None, grad: dict | None = None, seed: int | None = None,
         objects: dict | None = None, **kwargs: Any) -> dict:
    """The spec of a plain call of `function` (dotted; a method with `init` is called on a new instance)."""
    spec: dict = {"adapter": "call", "function": function, "args": list(args), "kwargs": kwargs}
    for key, value in (("init", init), ("grad", grad), ("seed", seed), ("objects", objects)):
        if value is not None:
            spec[key] = value
    return spec


def load_checks(root: Path, task_id: str, hidden: bool) -> list[Check]:
    """The public (and, with `hidden`, the hidden) checks of a task, from `root`/grading."""
    files = [(root / "grading" / f"task_{task_id.replace('.', '_')}.py", False)]
    if hidden:
        files.append((root / "grading" / "hidden" / f"task_{task_id.replace('.', '_')}.py", True))
    checks = []
    for path, is_hidden in files:
        if not path.exists():
            if is_hidden:
                continue
            raise FileNotFoundError(f"task {task_id}: {path} is missing from the grader's tree")
        spec = importlib.util.spec_from_file_location(f"hw3_grading_{path.stem}_{int(is_hidden)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for index, check in enumerate(module.CHECKS):
            kind = "hidden" if is_hidden else "public"
            checks.append(replace(check, hidden=is_hidden, task=task_id, key=f"{task_id}/{kind}/{index}"))
    return checks


def has_hidden(root: Path) -> bool:
    return (root / "grading" / "hidden").is_dir()


# ---------------------------------------------------------------------------------------------- verdicts
@dataclass
class Verdict:
    passed: bool
    message: str = ""
    stub: bool = False  # returned an input unchanged where the solution does not


def judge(check: Check, inputs: Values, outputs: Values, reference: Values | None) -> Verdict:
    """The grader's verdict on one check's outputs (a property, or a comparison with the solution's outputs)."""
    stub = _stub_output(inputs, outputs, reference)
    if stub:
        return Verdict(False, f"returns its input `{stub[1]}` unchanged as `{stub[0]}` (a stub): 0 points for the "
                              "task", stub=True)
    if check.prop is not None:
        try:
            why = check.prop(inputs, outputs)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            why = f"outputs not as expected ({type(err).__name__}: {err})"
        return Verdict(why is None, _hinted(check, why or ""))
    if reference is None:
        raise RuntimeError(f"check {check.key} ({check.name}) has no reference outputs")
    for name, expected in reference.items():
        why = _compare(name, expected, outputs.get(name, _MISSING), check)
        if why:
            return Verdict(False, _hinted(check, why))
    return Verdict(True)


_MISSING = object()


def _hinted(check: Check, message: str) -> str:
    return f"{message}; {check.hint}" if message and check.hint else message


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def _compare(name: str, expected: Any, received: Any, check: Check) -> str | None:
    """Why `received` is not `expected` (output `name`), or None."""
    what = f"`{name}`"
    if received is _MISSING:
        return f"no output {what} (expected a tensor of {_shape(expected)})" if isinstance(expected, torch.Tensor) \
            else f"no output {what}"
    if isinstance(expected, torch.Tensor):
        if not isinstance(received, torch.Tensor):
            return f"{what}: expected a tensor of {_shape(expected)}, received {_kind(received)}"
        if received.shape != expected.shape or received.dtype != expected.dtype:
            return f"{what}: expected {_shape(expected)}, received {_shape(received)}"
        if expected.dtype == torch.bool or not expected.is_floating_point():
            wrong = (received != expected).nonzero()
            if len(wrong):
                index = tuple(wrong[0].tolist())
                return (f"{what}: {len(wrong)} of {expected.numel()} values differ, first at index {index} "
                        f"(expected {expected[index].item()}, received {received[index].item()})")
            return None
        return _close(what, expected.double(), received.double(), check.atol, check.rtol)
    if isinstance(expected, bool) or not isinstance(expected, float):
        return None if received == expected else f"{what}: expected {expected!r}, received {_kind(received)}"
    if not isinstance(received, int | float) or isinstance(received, bool):
        return f"{what}: expected the number {expected:.6g}, received {_kind(received)}"
    if abs(received - expected) > check.atol + check.rtol * abs(expected) or received != received:
        error = abs(received - expected)
        return f"{what}: expected {expected:.7g}, received {received:.7g} (absolute error {error:.3g})"
    return None


def _close(what: str, expected: torch.Tensor, received: torch.Tensor, atol: float, rtol: float) -> str | None:
    finite = torch.isfinite(expected) == torch.isfinite(received)
    error = (received - expected).abs().nan_to_num(nan=float("inf"))
    error[torch.isfinite(expected) & (received == expected)] = 0.0
    bad = (error > atol + rtol * expected.abs()) | ~finite
    if not bad.any():
        return None
    flat = int(torch.where(bad.flatten(), error.flatten(), torch.tensor(-1.0, dtype=error.dtype)).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape)) if expected.dim() else ()
    largest = error.max().item()
    return (f"{what}: {int(bad.sum())} of {expected.numel()} values off; largest absolute error {largest:.3g} "
            f"at index {index} (expected {expected[index].item():.7g}, received {received[index].item():.7g}); "
            f"tolerance {atol:g} + {rtol:g} * |expected|")


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of {_shape(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _stub_output(inputs: Values, outputs: Values, reference: Values | None) -> tuple[str, str] | None:
    """(output, input) when a tensor output equals an input tensor that the solution's same output does not."""
    for name, out in outputs.items():
        if not isinstance(out, torch.Tensor) or name.startswith(("grad.", "seen.")) or out.numel() < 2:
            continue
        expected = reference.get(name) if reference else None
        for input_name, value in inputs.items():
            if not isinstance(value, torch.Tensor) or value.shape != out.shape or value.dtype != out.dtype:
                continue
            if torch.equal(value, out) and not (isinstance(expected, torch.Tensor) and torch.equal(expected, value)):
                return name, input_name
    return None
