# The two commands people run: `make demo` (main job on the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install controlplane lint test demo explore-demo plane plane-down chart-install bench clean

install:
	@scripts/install-host.sh
	@scripts/install.sh

# The plane's and the real nodes' binaries, and the images real nodes run (each cached by input hash).
controlplane: install
	@$(VENV)/bin/kubeplane build --all
	@$(VENV)/bin/kubeplane images

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# pytest exits 5 when it collected no tests: that is not a failure here.
test: controlplane lint
	$(PY) -m pytest $(PYTEST_ARGS); code=$$?; [ $$code -eq 0 ] || [ $$code -eq 5 ]

# On real pods: plane with a real node, the chart-installed operator, the CPU example job and a trainer pod,
# with the job's progress refreshed in the terminal; Ctrl-C tears it all down.
demo: controlplane
	$(PY) -m explorer_operator.demo

# The runtime alone: local CPU vLLM engines + Ray runners + the built-in arithmetic taskset.
explore-demo: install
	$(PY) -m explorer demo

# Only the local plane (4 fake GPU nodes and one real node), in the background, for poking with kubectl.
plane: controlplane
	@$(VENV)/bin/kubeplane cluster up --real-nodes 1

plane-down: install
	@$(VENV)/bin/kubeplane cluster down

# The Helm chart into the plane started by `make plane` (one command; the operator image is not pulled by kwok).
chart-install: install
	@eval "$$($(VENV)/bin/kubeplane cluster env)" && helm upgrade --install explorer-operator helm/explorer-operator \
		--namespace explorer-system --create-namespace -f examples/local/operator-values.yaml --wait --timeout 300s \
		&& kubectl get deploy,pods -n explorer-system -o wide

bench: controlplane
	$(PY) bench/controlplane.py
	$(PY) bench/operator_scale.py
	$(PY) bench/scheduler.py --engines
	$(PY) bench/stragglers.py
	$(PY) bench/weight_sync.py
	$(PY) bench/experience_stream.py

clean:
	rm -rf .cache/kubeplane .mypy_cache .ruff_cache .pytest_cache
