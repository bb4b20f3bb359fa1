"""The experiments around lora.py: one protocol shared by every experiment, and one sub-package per experiment.

Shared (never imports an experiment):
    methods.py     a Method (full finetuning, linear probe, LoRA/DoRA at a rank on a target set) as data
    protocol.py    tune on validation seeds -> chosen learning rates -> sweep on the reported seeds; the run cache
    trainer.py     the stacked trainer: many models of one architecture in one pass (vmap)
    parallel.py    on the CPU, the jobs of a search or sweep one per core, each on one thread
    plain_loop.py  one model at a time: the text runs, the tests' reference, the bench's baseline
    stats.py       mean with its t-interval, paired differences over seeds
    report.py      the summary's one column schema, intervals, verdicts, tables, README blocks
    figures.py     parameters against accuracy, and the paired-difference panel
    storage.py     where files go; atomic writes, the run cache, hashes
    notebook.py    the notebooks' config, output folder and device, and the test-only switches
    __main__.py    python -m experiments tune|sweep|readme|has-gpu --experiment mlp|transformer|text

One sub-package per experiment: its config, data, models, and experiment.py, a protocol.Experiment subclass.
    mnist/         MNIST 0-4 -> 5-9: the reference MLP (its stacked step written out in stacked_mlp.py) and a row transformer
    text/          MiniLM-L6 on Rotten Tomatoes and IMDB sentiment, many adapters stacked in one pass

A new method: a field of methods.Method (and what it changes in each experiment's models). A new model on
MNIST: mnist/models.py and a Config field value. A new dataset: a sub-package with a config, its data and an
Experiment subclass, registered in __main__.py.
"""
