# Developer entry points. `make test` works on a fresh clone: it builds .venv first.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PORT ?= 8188
# pytest-xdist workers for `make test`; the real-host and browser tests stay together on one of them
TEST_WORKERS ?= 2
# where the venv's torch comes from when none is installed: empty = your pip index (PyPI's Linux wheel
# is the CUDA build); https://download.pytorch.org/whl/cpu for the small CPU-only wheel
TORCH_INDEX ?=

.PHONY: venv demo demo-model demo-model-release test test-deps test-fast lint tiny serve workflows locales registry-check bench device-wheels clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VPY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv  # the main job: the shipped demo model upscales the bundled inputs into out/demo/
	$(VPY) -m tadisr_core.demo -o out/demo

DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_RUN ?= runs/demo-model-$(DEMO_STAMP)
DEMO_DIR = $(patsubst %/,%,$(DEMO_RUN))
# One training phase (config, run folder, more arguments): skipped when that run finished, resumed when it
# was stopped, so an interrupted `make demo-model` continues with `make demo-model DEMO_RUN=<its folder>`.
train_phase = test -f $(2)/model_final.safetensors || OMP_NUM_THREADS=1 $(VPY) -m training.train --config $(1) \
	--output-dir $(2) $(3) $$(test -d $(2) && echo --resume)
demo-model: venv  # re-train the demo model from scratch (about 4 h on 2 CPU cores, four phases) and ship it
	@echo "demo-model: runs in $(DEMO_DIR)-*; if stopped, continue with: make demo-model DEMO_RUN=$(DEMO_DIR)"
	$(call train_phase,training/configs/demo_prior.yaml,$(DEMO_DIR)-prior)
	$(call train_phase,training/configs/demo.yaml,$(DEMO_DIR)-task,--set model.init_checkpoint=$(DEMO_DIR)-prior/model_final.safetensors)
	$(call train_phase,training/configs/demo_finetune.yaml,$(DEMO_DIR)-finetune,--set model.init_checkpoint=$(DEMO_DIR)-task/model_final.safetensors)
	$(call train_phase,training/configs/demo_crop256.yaml,$(DEMO_DIR),--set model.init_checkpoint=$(DEMO_DIR)-finetune/model_final.safetensors)
	$(VPY) -m training.export_model $(DEMO_DIR) tadisr_core/demo

demo-model-release: venv  # train the release-layout demo from the shipped paper demo (about 50 min on 2 CPU cores) and ship it
	$(VPY) -m training.train --config training/configs/demo_release.yaml --output-dir $(DEMO_RUN)-release
	$(VPY) -m training.export_model $(DEMO_RUN)-release tadisr_core/demo_release --name tadisr_demo_release

test-deps:
	bash scripts/install_test_deps.sh

test: venv test-deps
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: venv
	$(VPY) -m ruff check .

test-fast: venv
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup -m "not slow and not host and not browser"

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

# What the lent GPU machine lacks for benchmarks/bench_gpu_full.py, bench_train_step.py and bench_gpu_lowvram.py
# (its image: Python 3.12, torch 2.11 cu130, peft, transformers, accelerate, safetensors...; no network; the list
# is in the device tool's KINDS.md), as cp312 x86_64 wheels in .device_wheels/ (git-ignored), pinned to the
# versions the dev venv tests. importlib_metadata is diffusers' declared need, not imported on 3.12. The run
# tool carries the folder (carry=[".device_wheels"]); scripts/device_bench.sh installs it offline, --no-deps.
DEVICE_WHEELS := diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0 importlib_metadata==10.2.0
DEVICE_WHEELS_DIR := .device_wheels
device-wheels:
	rm -rf $(DEVICE_WHEELS_DIR)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(DEVICE_WHEELS_DIR) $(DEVICE_WHEELS)
	@test $$(ls $(DEVICE_WHEELS_DIR)/*.whl | wc -l) -eq $(words $(DEVICE_WHEELS)) \
		|| { echo "device-wheels: expected $(words $(DEVICE_WHEELS)) wheels in $(DEVICE_WHEELS_DIR)" >&2; exit 1; }
	@# what the run tool sends: tracked and untracked-not-ignored files plus the carried wheels, 64 MiB at most
	@git ls-files -co --exclude-standard -z | $(PY) -c "import os, sys; \
	tree = sum(os.lstat(n).st_size for n in sys.stdin.buffer.read().split(b'\0') if n and os.path.lexists(n)); \
	whl = sum(e.stat().st_size for e in os.scandir('$(DEVICE_WHEELS_DIR)')); \
	print(f'device-wheels: wheels {whl / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = ' \
	      f'{(whl + tree) / 2**20:.1f} MiB of the 64 MiB a run may send'); sys.exit((whl + tree) > 60 * 2**20)"

clean:
	rm -rf $(VENV) .build
