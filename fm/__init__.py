"""Foundation models: self-attention, a GPT-2 we can read, KV-cache generation, SFT, DPO and LoRA.

Submodules are imported on use (`from fm.model import GPT`) so that `import fm` stays cheap: the transformers version
is read from the installed package's metadata, without importing it.
"""

from importlib.metadata import PackageNotFoundError, version

TRANSFORMERS_MAJOR = 5  # the API fm relies on: e.g. the `cache` keyword of forward (fm.generate), `dtype=` loading


def _check_transformers() -> None:
    """Fail at `import fm` on a transformers older than v5, whose API differs, instead of deep inside a run."""
    try:
        installed = version("transformers")
    except PackageNotFoundError:  # the modules that need it fail at their own import with the usual message
        return
    major = installed.split(".")[0]
    if not major.isdigit() or int(major) < TRANSFORMERS_MAJOR:
        raise ImportError(
            f"fm needs transformers {TRANSFORMERS_MAJOR}.x, but transformers {installed} is installed; "
            f"upgrade it with `pip install 'transformers>={TRANSFORMERS_MAJOR},<{TRANSFORMERS_MAJOR + 1}'`"
        )


_check_transformers()
