# Everything goes into .venv; a fresh clone needs only python3 (3.11) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch and torchvision must be a matching pair (timm imports torchvision).
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
DEMO_OUT ?= runs/demo
# The demo trains with Gaussian noise so that its served answer carries a smoothing certificate.
DEMO_SIGMA ?= 0.25

.PHONY: setup demo test test-fast lint bench clean check-java

setup: $(STAMP) check-java

# TorchServe (the serving tests and the demo) runs on Java 17.
check-java:
	@java -version 2>&1 | grep -q 'version "17' || { \
	  echo "TorchServe needs Java 17 (found: $$(java -version 2>&1 | head -n 1 || echo none))."; \
	  echo "Install it with: sudo apt-get install -y openjdk-17-jre-headless"; exit 1; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PAIR)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/specformer-deploy train --out $(DEMO_OUT) --noise-sd $(DEMO_SIGMA)
	$(VENV)/bin/specformer-deploy export $(DEMO_OUT) --out $(DEMO_OUT)/export/model.onnx
	$(VENV)/bin/specformer-deploy audit $(DEMO_OUT)/export/model.onnx --plot $(DEMO_OUT)/export/sigma_per_layer.png
	$(PY) tools/sample_image.py $(DEMO_OUT)/digit.png
	$(VENV)/bin/specformer-deploy certify $(DEMO_OUT)/export/model.onnx $(DEMO_OUT)/digit.png --probe pgd --eps 0.03 --smoothing
	$(PY) tools/serve_local.py --onnx $(DEMO_OUT)/export/model.onnx --name digits --root $(DEMO_OUT)/torchserve \
	  --image $(DEMO_OUT)/digit.png --smoothing

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not serving"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) tools/bench/msvp.py

clean:
	rm -rf runs .pytest_cache
