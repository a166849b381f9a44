# fedmaestro: `make run` runs the main job, `make test` the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.install-stamp
FMNIST := /usr/share/datasets/fashion-mnist
ARCH   := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install test test-fast run bench clean fashion-mnist

install: $(STAMP) fashion-mnist

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -c constraints.txt -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

# The offline default data set: Debian's dataset-fashion-mnist, installed when we can (root, apt).
fashion-mnist:
	@if ! ls $(FMNIST)/train-images-idx3-ubyte* $(FMNIST)/train-labels-idx1-ubyte* $(FMNIST)/t10k-images-idx3-ubyte* \
			$(FMNIST)/t10k-labels-idx1-ubyte* >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) \
		&& echo "installed dataset-fashion-mnist"; \
	fi

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The default federated job: LeNet-5 on Fashion-MNIST, 20 clients (Dirichlet 0.5), three device tiers,
# 20 rounds of Maestro (conf/experiment/fl_maestro.yaml); about 2-3 minutes on 2 cores.
run: install
	$(PY) -m fedmaestro +experiment=fl_maestro

# Every benchmark prints its figures and exits 1 on a missed target; all three run, then make fails if any missed.
bench: install
	@status=0; \
	$(PY) bench/layers.py || status=1; \
	$(PY) bench/train_step.py || status=1; \
	$(PY) bench/fl_round.py +experiment=fl_maestro || status=1; \
	exit $$status

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
