"""The homework's tasks and their points: the one table that the release and the grader read.

A task owns the functions whose solution regions a student fills in (`functions`, matched by name against the
function that encloses each `### BEGIN SOLUTION` marker). Its graded checks are `grading/task_<id>.py` (shipped to
students, so they can preview their grade) and `grading/hidden/task_<id>.py` (kept out of the student release); a
task's points are split evenly over all its checks (`course.checks`), and are 0 when a function of the task
returns one of its inputs unchanged.

To add a task: wrap the code a student writes in solution markers, add a `Task` here with its functions, and write
its checks (small and fast; each must fail on the release's `raise NotImplementedError`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    id: str  # "1.1": the homework's numbering
    title: str
    points: int
    notebook: str  # where the task is run and its results are made; named in the release's NotImplementedError
    functions: tuple[str, ...]  # functions (or methods) whose solution regions belong to this task
    # the package's own tests of the same code (tests/): they write the graded formulas out, so they stay out of the
    # student release
    package_tests: tuple[str, ...] = ()
    timeout: int = 120  # seconds for the task's worker (all its checks); past it, unfinished checks get 0


TASKS: tuple[Task, ...] = (
    Task(
        "1.1", "Multi-head self-attention", 15, "notebooks/1_1_attention.ipynb",
        functions=("get_masked_attention", "multi_head_self_attention"),
        package_tests=("tests/test_attention.py",),
    ),
    Task(
        "1.2", "Supervised fine-tuning: the loss mask and the SFT loss", 15, "notebooks/1_2_sft.ipynb",
        functions=("sft_labels", "sft_loss"),
        package_tests=("tests/test_fm_data.py", "tests/test_sft.py"),
    ),
    Task(
        "1.3", "Direct preference optimization: the DPO and IPO losses", 15, "notebooks/1_3_dpo.ipynb",
        functions=("dpo_loss", "ipo_loss"),
        package_tests=("tests/test_dpo.py",),
    ),
    Task(
        "2.1", "VAE: the KL divergence and the reparameterization trick", 15, "notebooks/2_1_vae.ipynb",
        functions=("kl_divergence", "reparameterize"),
        package_tests=("tests/test_vae.py",),
    ),
    Task(
        "2.2", "VAE + PatchGAN: the hinge losses", 10, "notebooks/2_2_gan.ipynb",
        functions=("d_hinge_loss", "g_hinge_loss"),
        package_tests=("tests/test_gan.py",),
    ),
    Task(
        "2.3", "DDPM: forward process, posterior, loss, DDPM and DDIM steps", 30, "notebooks/2_3_ldm.ipynb",
        functions=("q_sample", "q_posterior", "p_losses", "ddpm_update", "ddim_update"),
        package_tests=("tests/test_diffusion.py",),
    ),
)


def task_by_id(task_id: str) -> Task:
    for task in TASKS:
        if task.id == task_id:
            return task
    raise ValueError(f"unknown task {task_id!r}; tasks: {', '.join(t.id for t in TASKS)}")


def task_of_function(name: str) -> Task | None:
    """The task whose `functions` lists `name`, or None."""
    matches = [task for task in TASKS if name in task.functions]
    if len(matches) > 1:
        raise ValueError(f"function {name!r} is listed by tasks {[t.id for t in matches]}; list it under one task")
    return matches[0] if matches else None
