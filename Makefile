# One-command set-up: `make test` and `make demo` create .venv and install the pinned set on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench gpu-check venv clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(BIN)/python -m compactfusion.codecs.fused || true  # build the fused CPU codec kernels once (optional)
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q tests

demo: $(STAMP)
	$(BIN)/compactfusion generate --nproc 4 --strategy ring --codec binary --warmup-steps 1 --reference --prompt 7 --out out

bench: $(STAMP)
	$(BIN)/python -m compactfusion.bench.make_docs --out docs

# Everything that needs CUDA (<= 5 min on one GPU), as one JSON report; --cpu-smoke runs it on tiny CPU shapes.
gpu-check: $(STAMP)
	$(BIN)/python -m compactfusion.bench.gpu_check --out gpu_check.json

clean:
	rm -rf $(VENV) out .pytest_cache
