# The README's two commands are `make run` and `make test`; each sets up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup run test explain-samples bench bench-full bench-engine clean

setup:
	@scripts/setup.sh

## Main job: explain the bundled sample photos into out/
run: explain-samples

explain-samples: setup
	$(VENV)/bin/pathway-explain --save-attribution --out out $$($(PY) -m handler.samples)

## Tests (CPU; CUDA-only tests skip without a GPU)
test: setup
	$(PY) -m pytest

## Speed and memory benchmark suite (writes benchmarks/speed/results/; see benchmarks/speed/README.md)
bench: setup
	$(PY) benchmarks/speed/run.py

bench-full: setup
	$(PY) benchmarks/speed/run.py --full

## Quick check: pathway/vanilla ratio of the engine, glibc's default allocator vs retained heap
bench-engine: setup
	$(PY) benchmarks/speed/engine.py

clean:
	rm -rf out .pytest_cache
