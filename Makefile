# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv train-tiny bench clean

venv: $(STAMP)

# torch goes first and pinned: an unpinned torch would pull several GB of CUDA packages.
$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet 'torch==2.13.0'
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m marigold_ros.demo --output demo_output

test: $(STAMP)
	ROS_AUTOMATIC_DISCOVERY_RANGE=OFF $(PY) -m pytest -q test

train-tiny: $(STAMP)
	$(PY) -m marigold_model.tiny_recipe

bench: $(STAMP)
	$(PY) bench/estimator.py

clean:
	rm -rf $(VENV) build *.egg-info demo_output
