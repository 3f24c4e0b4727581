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

.PHONY: demo test venv train-tiny bench mutation clean

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

# TEST_SCOPE=ros: only the tests that touch ROS (.ci/run's second distribution; see conftest)
TEST_SCOPE ?= all
test: $(STAMP)
	ROS_AUTOMATIC_DISCOVERY_RANGE=OFF MARIGOLD_TEST_SCOPE=$(TEST_SCOPE) $(PY) -m pytest -q test

train-tiny: $(STAMP)
	$(PY) -m marigold_model.training.tiny_recipe

bench: $(STAMP)
	$(PY) bench/estimator.py

# Mutation testing of the modules where a wrong number would go unnoticed (setup.cfg [mutmut]
# lists them and the tests that guard them); of the estimator only the timestep schedule and
# the DDIM update.  Slow (~4500 mutants: hours on two shared cores), so not part of `make test`;
# one module: make mutation MUTANTS="'marigold_model.ensemble.*'".  Prints a score per
# module and every survivor that is neither killed nor explained in bench/mutation_equivalent.txt
# (MUTATION_STRICT=1: fail if there is one).
MUTMUT ?= mutmut==3.8.1
MUTATION_CHILDREN ?= 2
MUTANTS ?= 'marigold_model.ensemble.*' 'marigold_model.alignment.*' \
	'marigold_model.scale_tracking.*' 'marigold_model.scale_apply.*' \
	'marigold_model.data.image_decoding.*' 'marigold_ros.geometry.*' \
	'marigold_ros.distortion.*' 'marigold_ros.conversions.*' \
	'marigold_model.estimator.x*_schedule__mutmut_*' \
	'marigold_model.estimator.x*_closed_form_ddim__mutmut_*' \
	'marigold_model.estimator.x*_ddim_step__mutmut_*'
mutation: $(STAMP)
	$(PY) -m pip install --quiet '$(MUTMUT)'
	rm -rf mutants && mkdir mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ROS_AUTOMATIC_DISCOVERY_RANGE=OFF nice -n 10 \
	  $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS) \
	  > mutants/run.log 2>&1 || { tail -n 40 mutants/run.log; exit 1; }
	$(VENV)/bin/mutmut results --all true | \
	  $(PY) bench/mutation_summary.py $(if $(MUTATION_STRICT),--strict)

clean:
	rm -rf .venv .venv-jazzy build *.egg-info demo_output mutants
