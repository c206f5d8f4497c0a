# batchcap developer tasks. `make install` then `make test` is what CI runs.
PYTHON ?= python3
# A CPU build of torch for CI and laptops; on a GPU machine use `make install TORCH=torch`.
TORCH ?= torch==2.13.0

.PHONY: install test lint bench bench-asr bench-images clean

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[dev]"

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .

bench: bench-asr bench-images

bench-asr:
	$(PYTHON) scripts/bench_asr.py

bench-images:
	$(PYTHON) scripts/bench_images.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
