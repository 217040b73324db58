# The README's two commands are `make run` and `make test`; each sets up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup run serve model-store test explain-samples bench bench-full bench-engine quality clean

setup:
	@scripts/setup.sh

## Main job: build model_store/efficientnet_lite0.mar and serve it with TorchServe on 127.0.0.1 (foreground)
run: serve

serve: setup
	@$(VENV)/bin/pathway-serve

## Model archive of the default model (pathway-archive --help for your own classifier)
model-store: setup
	$(VENV)/bin/pathway-archive

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

## Explanation-quality report (tens of minutes on a CPU): benchmarks/quality/REPORT.md
quality: setup
	$(PY) benchmarks/quality/report.py

clean:
	rm -rf out var .pytest_cache model_store/*.mar
