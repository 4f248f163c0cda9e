# The two commands of the README. Both build .venv on first use (CPU torch 2.13.0 from the
# machine's local wheel, megatron-core 0.16.1; see constraints-ci.txt) and reuse it after.
PYTHON ?= python3
# an extra package index for torch, e.g. https://download.pytorch.org/whl/cpu for the CPU build
TORCH_INDEX ?=
VENV := .venv
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TORCHDYNAMO_DISABLE := 1

.PHONY: quickstart test

quickstart: $(STAMP)
	$(VENV)/bin/python examples/quickstart.py

test: $(STAMP)
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --check --no-cache .
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests/test_quickstart.py tests/test_reproduce_small.py tests/benchmarks tests/training tests/tools tests/unit tests/data
	$(VENV)/bin/python -m torch.distributed.run --standalone --nproc_per_node=4 -m pytest -q tests/dist4
	$(VENV)/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 -m pytest -q tests/dist

$(STAMP): requirements.txt constraints-ci.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints-ci.txt $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) -e '.[test]'
	touch $(STAMP)
