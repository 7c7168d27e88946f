# Developer entry points. `make test` works on a fresh clone: it builds .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PORT ?= 8188

.PHONY: venv test test-deps test-fast tiny serve workflows locales registry-check bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

test-deps:
	bash scripts/install_test_deps.sh

test: venv test-deps
	$(VPY) -m pytest -q

test-fast: venv
	$(VPY) -m pytest -q -m "not slow and not host and not browser"

tiny: venv
	$(VPY) -m tadisr_core.testing make-tiny .build/tiny

serve: venv
	$(VPY) -m devtools.comfy_host serve --port $(PORT)

workflows: venv  # rebuild example_workflows/ in the dev host (graphs, API copies, thumbnails)
	$(VPY) -m devtools.build_workflows

locales: venv  # locales/en/nodeDefs.json from the node schemas, via the dev host
	$(VPY) -m devtools.locales

registry-check:  # what the Comfy Registry checks before publishing (comfy-cli in its own venv)
	test -x .build/comfycli/bin/comfy || ($(PY) -m venv .build/comfycli && .build/comfycli/bin/pip install -q comfy-cli)
	.build/comfycli/bin/comfy --skip-prompt --no-enable-telemetry node validate

bench: venv
	$(VPY) benchmarks/bench_pipeline_cpu.py

clean:
	rm -rf $(VENV) .build
