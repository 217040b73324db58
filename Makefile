# The README's two commands are `make run` and `make test`; each sets up .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup run test explain-samples bench quality clean

setup:
	@scripts/setup.sh

## Main job: explain the bundled sample photos into out/
run: explain-samples

explain-samples: setup
	$(VENV)/bin/pathway-explain --save-attribution --out out $$($(PY) -m handler.samples)

## Tests (CPU; CUDA-only tests skip without a GPU)
test: setup
	$(PY) -m pytest

## Speed benchmark of the engine (writes benchmarks/speed/results/)
bench: setup
	$(PY) benchmarks/speed/engine.py

## Explanation-quality report (tens of minutes on a CPU): benchmarks/quality/REPORT.md
quality: setup
	$(PY) benchmarks/quality/report.py

clean:
	rm -rf out .pytest_cache
