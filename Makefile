# pnn-sweep: the everyday commands. Needs Python 3.10+ (`make PYTHON=python3.12 ...` to pick one).
# Every target that runs code first makes sure .venv exists and matches pyproject.toml
# (a venv without pip, left by a failed `python3 -m venv`, is made again).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Written after a successful install; pip runs again whenever pyproject.toml is newer.
STAMP := $(VENV)/.installed

# On the project's machines pip finds these two on local disk; elsewhere it downloads them.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: help venv test sweep demo ui lint device-wheels clean-venv

help:
	@echo "make demo    the eight experiments x 2 seeds, narrow, on synthetic data (minutes on a CPU), then the tables"
	@echo "make test    the test suite (includes the browser test of the MLflow UI)"
	@echo "make sweep   the eight experiments on CIFAR-10 (downloaded to data/), logged to mlflow.db"
	@echo "make ui      MLflow UI for mlflow.db at http://127.0.0.1:5000 (prints the link to the runs)"
	@echo "make lint    ruff check, ruff format --check, lint-imports (the stages)"
	@echo "make device-wheels  .whl/: the wheels bench/device_run.sh needs on a GPU image without them"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "pnn-sweep needs Python 3.10+; $(PYTHON) is $$($(PYTHON) -V 2>&1)." \
		       "Try: make PYTHON=python3.11 $(MAKECMDGOALS)"; exit 1; }
	test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

# pytest-xdist: one worker per usable core (tests/conftest.py), the slow tests first; the
# tests sharing a module-scoped fixture stay on one worker (--dist loadgroup).
test: venv
	$(BIN)/python -m pytest -ra -n auto --dist loadgroup

sweep: venv
	$(BIN)/python sweep.py

demo: venv
	$(BIN)/python sweep.py profile=demo
	$(BIN)/python analyze.py

# The UI's address; the printed link opens the runs in MLflow 3's model-training view.
UI_HOST ?= 127.0.0.1
UI_PORT ?= 5000

ui: venv
	@$(BIN)/python -m pnn.analysis.ui --tracking-uri sqlite:///mlflow.db --base-url http://$(UI_HOST):$(UI_PORT)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host $(UI_HOST) --port $(UI_PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# The GPU machine's image has torch but not Hydra, OmegaConf or pytest: bench/device_run.sh
# installs .whl/*.whl when the call carries .whl (the versions of this venv, built as wheels).
DEVICE_PKGS := hydra-core|omegaconf|antlr4-python3-runtime|pytest|pluggy|iniconfig|packaging|pygments

device-wheels: venv
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip freeze | grep -iE '^($(DEVICE_PKGS))==' > .whl/requirements.txt
	$(BIN)/pip wheel -q --no-deps -w .whl -r .whl/requirements.txt
	@ls .whl

clean-venv:
	rm -rf $(VENV)
