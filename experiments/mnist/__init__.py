"""MNIST as two tasks, digits 0-4 then 5-9: the reference MLP and a row transformer (config, data, models,
and experiment.py, how a run plugs into the protocol)."""
