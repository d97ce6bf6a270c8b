# Two commands from a fresh clone: `make demo` and `make test`. Both install into .venv first.
# torch is installed on its own first (the CPU wheel) so pip never pulls a multi-GB CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= out/demo
PYTEST_ARGS ?=
# Two workers, each test file on one (its module fixtures are built once): the suite is mostly
# single-threaded Python (tracing, conversion), so 2 cores run it in about half the time.
PYTEST_PARALLEL ?= -n 2 --dist loadfile

.PHONY: install demo test test-extended test-full-width bench-cpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The main job on built-in tiny presets: export to both backends, prove each artifact, generate from one.
demo: install
	rm -rf $(DEMO_DIR)
	$(VENV)/bin/perch export falcon-tiny --to onnx --out $(DEMO_DIR)/falcon-onnx
	$(VENV)/bin/perch check $(DEMO_DIR)/falcon-onnx
	$(VENV)/bin/perch export falcon-mamba-tiny --to coreml --out $(DEMO_DIR)/falcon-mamba-coreml
	$(VENV)/bin/perch check $(DEMO_DIR)/falcon-mamba-coreml
	$(VENV)/bin/perch generate $(DEMO_DIR)/falcon-onnx --prompt "The list type" --max-new-tokens 12

test: install
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=25 --ignore=tests/test_full_width.py -m "not extended" $(PYTEST_ARGS)

# What `make test` leaves out to stay under 20 minutes (marker `extended`): coremltools' own suite over the
# executor, the trained Falcon-H1 fixture, and second precisions of paths the suite proves once. ~6 minutes on 2 cores.
test-extended: install
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=25 --ignore=tests/test_full_width.py -m extended $(PYTEST_ARGS)

# Real widths at 2 layers (7B, Mamba-7B, 40B shapes) against transformers: ~25 CPU-minutes and ~30 GB of
# disk, so a target of its own (issue 12), not part of the 20-minute suite.
test-full-width: install
	$(PY) -m pytest -q --durations=0 tests/test_full_width.py

bench-cpu: install
	$(PY) benchmarks/onnx_cpu.py
	$(PY) benchmarks/coreml_convert.py

clean:
	rm -rf out .pytest_cache
