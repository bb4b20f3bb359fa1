"""MiniLM-L6 on drug-review sentiment (config, data, model, and experiment.py, how a run plugs into the
protocol)."""
