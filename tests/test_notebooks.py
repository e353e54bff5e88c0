"""Every notebook runs end to end in the `smoke` profile (a few steps each), so a broken notebook fails CI."""

import pytest

from common.run_notebooks import list_notebooks, run_notebook


@pytest.mark.slow
@pytest.mark.parametrize("path", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(path):
    seconds = run_notebook(path, profile="smoke", timeout=600)
    assert seconds > 0


def test_every_notebook_is_run_by_make_figures():
    from pathlib import Path

    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "common.run_notebooks --profile $(PROFILE)\n" in makefile  # no names: runs all of notebooks/
    assert list_notebooks(), "notebooks/ is empty"
