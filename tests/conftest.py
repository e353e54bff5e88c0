"""Tests never touch the network and never overwrite the report's figures or checkpoints.

`make test` runs them in 2 pytest-xdist workers, one core each, with whole modules and GROUPS kept in one worker
(`pytest_xdist_make_scheduler`); a plain `pytest` runs them in one process, in the same order."""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one core per worker, for it and what it starts
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["HW3_PROFILE"] = "smoke"


@pytest.fixture(autouse=True)
def _isolated_outputs(tmp_path_factory, monkeypatch):
    """Figures and checkpoints of a test go to a temporary folder."""
    root = tmp_path_factory.mktemp("outputs")
    monkeypatch.setenv("HW3_FIG_DIR", str(root / "fig"))
    monkeypatch.setenv("HW3_CKPT_DIR", str(root / "checkpoints"))


@pytest.fixture(scope="session")
def notebook_dirs(tmp_path_factory) -> dict[str, str]:
    """HW3_FIG_DIR and HW3_CKPT_DIR shared by every notebook run of the session (headless and in the browser): a
    notebook reads the runs of the notebooks before it, and a second run of a notebook loads the finished runs."""
    root = tmp_path_factory.mktemp("notebook_outputs")
    return {"HW3_FIG_DIR": str(root / "fig"), "HW3_CKPT_DIR": str(root / "checkpoints")}


@pytest.fixture(scope="session")
def notebooks_ran() -> set[str]:
    """Names of the notebooks that ran cleanly in the smoke profile this session, headless or in the browser."""
    return set()


@pytest.fixture
def interrupt_at():
    """`interrupt_at(setup, step)`: run `setup.trainer.fit` and crash at `step`, as a killed run would.

    `setup` has `trainer`, `step_fn` and `eval_fn`; the checkpoints written before `step` stay on disk.
    """

    def run(setup, step: int) -> None:
        def crash(s: int) -> dict[str, float]:
            if s == step:
                raise KeyboardInterrupt
            return setup.step_fn(s)

        with pytest.raises(KeyboardInterrupt):
            setup.trainer.fit(crash, setup.eval_fn)

    return run


# Modules that must run in one process, in this order. "notebooks": the session's notebook runs and the checks that
# read them (`notebook_dirs`, `notebooks_ran`). "grading": every test that starts the grader's sandboxed workers; they
# share one release and the hand-ins (tests/test_submit.py), and the attack tests find a worker left running by its
# command line, so no other grading may run beside them. They are also the two longest groups, so they go first.
GROUPS = {"test_notebooks.py": "notebooks", "test_browser.py": "notebooks", "test_submit.py": "grading",
          "test_grade_all.py": "grading", "test_course.py": "grading", "test_grade_attacks.py": "grading"}
ORDER = ("notebooks", "grading")


def pytest_collection_modifyitems(items):
    """The groups first, then the other modules in their order. In "notebooks" the browser tests run after the
    headless ones (which train their runs in the shared `notebook_dirs` first), and the `after_notebooks` tests last:
    they read what every notebook run wrote."""
    def key(item) -> tuple[int, int]:
        group = GROUPS.get(item.path.name)
        stage = 2 if item.get_closest_marker("after_notebooks") else 1 if item.get_closest_marker("browser") else 0
        return ORDER.index(group) if group else len(ORDER), stage

    items.sort(key=key)  # stable: keeps the order otherwise


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test` runs `pytest -n 2`), whatever --dist says: each module runs whole in one worker
    (its module fixtures are built once) and so does each of GROUPS, in the collection's order."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return GROUPS.get(module.rsplit("/", 1)[-1], module)

    config.option.loadscopereorder = False  # keep the collection's order: the longest groups start first
    return ModuleScheduling(config, log)
