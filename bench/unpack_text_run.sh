#!/usr/bin/env bash
# Puts a device call's archive (bench/text_on_gpu.sh's back.tgz) back into this checkout: the run cache under
# runs/text (git-ignored; the next call carries it), and, once the run has finished, results/text*, the executed
# lora_text.ipynb and runs/times.json. Then, where records came back, re-reads every text table and figure from them
# on this machine (python -m experiments.text.run --reread: the committed tables are then exactly what
# tests/test_text_records.py recomputes here) and regenerates the README's text block.
#
#     bash bench/unpack_text_run.sh FILES_AT/back.tgz
set -euo pipefail
archive=$(realpath "${1:?usage: bash bench/unpack_text_run.sh PATH/back.tgz}")
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
tar xzf "$archive"
echo "run cache: $(find runs/text -name '*.pt' | wc -l) finished jobs, $(du -sh runs/text | cut -f1)"
if ls results/text_*_runs.csv >/dev/null 2>&1; then
  # The earlier equal-budget run's per-seed files: the runs files hold every epoch's answers now.
  rm -f results/text_*_per_seed.csv results/text_*_test_correct.csv
  $py -m experiments.text.run --reread
  $py -m experiments readme --experiment text
  echo "tables, figures and the README's text block regenerated from the records; now: git status, look at every results/text*.png"
fi
