"""Tests never touch the network and never overwrite the report's figures or checkpoints."""

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
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


def pytest_collection_modifyitems(items):
    """The browser tests run after the others (the headless run of a notebook, if any, trains its runs in the shared
    `notebook_dirs` first), and the `after_notebooks` tests last: they read what every notebook run wrote."""
    def stage(item) -> int:
        return 2 if item.get_closest_marker("after_notebooks") else 1 if item.get_closest_marker("browser") else 0

    items.sort(key=stage)  # stable: keeps the order otherwise
