# `make figures` regenerates every figure of the report (quick profile unless PROFILE=full);
# `make test` runs the tests. Both create .venv and install everything on first use.
PROFILE ?= quick
# NPROC=8: every training run of the notebooks runs under torchrun in 8 processes (one GPU each), as HW3_NPROC=8
NPROC ?= 1
VENV ?= .venv
PY := $(VENV)/bin/python
# Data (CIFAR-10 JPEGs) is looked for in HW3_DATA_DIR, else ../shared/data, else data/ (common/paths.py: data_dir).
# OMP_WAIT_POLICY is left to OpenMP's default (idle threads spin briefly, then sleep). PASSIVE (never spin) made the
# small convolutions of Part Two pay a wake-up per parallel region: a latent-UNet training step ran ~1.3x slower.

.PHONY: figures seeds test lint notebook setup clean-cache lab kernel

$(VENV)/.installed: requirements.txt requirements-offline.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-offline.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name hw3 --display-name "Python (hw3)" >/dev/null
	if git rev-parse --git-dir >/dev/null 2>&1; then $(PY) -m nbstripout --install --attributes .gitattributes; fi
	touch $@

setup: $(VENV)/.installed

# make figures PROFILE=full FROM=2_1  restarts the sequence at notebook 2_1 (finished training runs load)
figures: $(VENV)/.installed
	HW3_NPROC=$(NPROC) $(PY) -m course.run_notebooks --profile $(PROFILE)$(if $(FROM), --from $(FROM))
	$(PY) -m course.report

# make seeds: the headline comparisons over 3 training seeds (mean and spread), too long for make figures:
# fig/seeds_fm.md (DPO vs SFT, IPO vs DPO) and fig/seeds_gm.md (gan_weight, DDIM eta, LDM cond. accuracy).
# Runs that the notebooks already trained with the same config load from checkpoints/.
seeds: $(VENV)/.installed
	$(PY) -m fm.seeds --profile $(PROFILE)
	$(PY) -m gm.seeds --profile $(PROFILE)

# make notebook NB=2_1  (runs one notebook headless)
notebook: $(VENV)/.installed
	HW3_NPROC=$(NPROC) $(PY) -m course.run_notebooks --profile $(PROFILE) $(NB)

# make lab: JupyterLab from the venv, at the repository root (notebooks/, fig/ and the package all visible).
# Notebooks run on the venv's kernel "hw3"; outputs are stripped from notebooks/*.ipynb when committed (nbstripout).
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab

# make kernel: register the venv's kernel "hw3" for your user, for a JupyterLab or VS Code installed elsewhere.
kernel: $(VENV)/.installed
	$(PY) -m ipykernel install --user --name hw3 --display-name "Python (hw3)"

# make test runs pytest in TEST_WORKERS processes (pytest-xdist; TEST_WORKERS=0: in one process), one core each:
# alone, the suite kept 0.9 of 2 cores busy, waiting on the notebook kernels, sandboxed graders and torchrun ranks it
# starts. tests/conftest.py keeps each module, and each group of modules that share state, in one worker.
# pytest's exit code 5 means it collected no tests: that fails too (make stops on any non-zero code).
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	@$(PY) -m pytest -n $(TEST_WORKERS); code=$$?; [ $$code -ne 5 ] || echo "pytest collected no tests" >&2; exit $$code

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean-cache:
	rm -rf .cache

# make student: the student release in dist/student (solution regions cut out, notebooks without outputs).
# make grade SUBMISSION=path/to/tree GRADE_OUT=dir TASKS=1.1,2.3: grades a submission (default: this tree) task by
# task in a bubblewrap sandbox and writes grade.json and grade.md to GRADE_OUT (default: the submission's folder
# name + "-grade", beside it: never inside the graded tree).
SUBMISSION ?= .
GRADE_OUT ?= $(abspath $(SUBMISSION))-grade
.PHONY: student grade

student: $(VENV)/.installed
	$(PY) -m course.release --out dist/student

grade: $(VENV)/.installed
	$(PY) -m course.grade $(SUBMISSION) --out $(GRADE_OUT)$(if $(TASKS), --tasks $(TASKS))

# make submit ID=alice: the hand-in (student release): preview grade, the notebooks run in the smoke profile (unless
# PROFILE= is given on the command line, e.g. PROFILE=quick for the real figures), report.md rendered, and
# submission-<ID>.zip with a manifest. make grade-all SUBMISSIONS=dir OUT=dir JOBS=n [GRADESCOPE=1]: a whole class.
.PHONY: submit grade-all
submit: $(VENV)/.installed
	$(PY) -m course.submit --profile $(if $(filter command line environment,$(origin PROFILE)),$(PROFILE),smoke)$(if \
	$(ID), --id $(ID))$(if $(NB), --notebooks $(NB))

JOBS ?= 1
grade-all: $(VENV)/.installed
	$(PY) -m course.grade_all $(SUBMISSIONS) --out $(OUT) --jobs $(JOBS)$(if $(TASKS), --tasks $(TASKS))$(if \
	$(GRADESCOPE), --gradescope)
