#!/bin/bash
# Submit the Bamba v2 continued-pretraining chain as dependent jobs:
#
#   extend (2T -> 2.5T, Olmo-Mix, constant)
#     -> mix (2.5T -> 3T, constant)        -> anneal_mix        \
#     -> mix_cosine (2.5T -> 3T, cosine)   -> anneal_mix_cosine  -> merge (weighted linear average)
#
#   slurm/stages.sh --init hf:/models/Bamba-9B --runs /runs/bamba-v2 [--weights 0.5,0.5] [-- extra overrides]
#
# Each stage starts from the final checkpoint of the one before (checkpoint.init_from) in its own
# run directory, and resumes itself if preempted. Every job runs this checkout's train.py and
# scripts/merge.py with one interpreter: $PYTHON, else the python3 on PATH when the chain is submitted.
# The stages train Bamba's global batch of 1,572,864 tokens per step on any number of nodes (gradient
# accumulation makes up for fewer GPUs); `-- train.global_batch_tokens=N` changes it.
# DRY_RUN=1 prints the sbatch commands.
set -euo pipefail

INIT=""
RUNS=""
WEIGHTS="0.5,0.5"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --init) INIT=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --weights) WEIGHTS=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "stages.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ -z "$INIT" || -z "$RUNS" ]]; then
  echo "usage: stages.sh --init (hf:DIR | CHECKPOINT) --runs DIR [--weights W1,W2] [-- overrides...]" >&2
  exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
DRY_RUN=${DRY_RUN:-0}
if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p logs  # train.sbatch's --output folder; SLURM does not create it
fi
PYTHON=${PYTHON:-$(command -v python3 || command -v python || true)}
if [[ -z "$PYTHON" ]]; then
  echo "stages.sh: no python3 on PATH; set PYTHON=/path/to/python" >&2
  exit 2
fi
PYTHON=$("$PYTHON" -c "import sys; print(sys.executable)")  # the real interpreter (not a shim), absolute
BAMBA_BATCH=1572864

# submit NAME DEPENDENCY ARGS...: prints the job id (in a dry run, the job name stands for it).
submit() {
  local name=$1 dep=$2
  shift 2
  local opts=(--parsable --job-name="$name")
  [[ -n "$dep" ]] && opts+=(--dependency="afterok:$dep")
  if [[ "$DRY_RUN" == 1 ]]; then
    printf 'sbatch' >&2; printf ' %q' "${opts[@]}" "$@" >&2; echo >&2
    echo "$name"
  else
    sbatch "${opts[@]}" "$@"
  fi
}

stage() {  # stage STAGE RUN_NAME DEPENDENCY INIT_FROM
  local stage=$1 run=$2 dep=$3 init=$4
  submit "$run" "$dep" --export="ALL,PYTHON=$PYTHON,TRAIN_PY=$repo/train.py" "$here/train.sbatch" \
    "+stage=$stage" "checkpoint.init_from=$init" "run.dir=$RUNS/$run" "run.name=$run" \
    "train.global_batch_tokens=$BAMBA_BATCH" ${EXTRA[@]+"${EXTRA[@]}"}
}

extend=$(stage extend extend "" "$INIT")
mix=$(stage mix mix "$extend" "$RUNS/extend")
mix_cosine=$(stage mix_cosine mix_cosine "$extend" "$RUNS/extend")
anneal_a=$(stage anneal anneal_mix "$mix" "$RUNS/mix")
anneal_b=$(stage anneal anneal_mix_cosine "$mix_cosine" "$RUNS/mix_cosine")
merge_cmd=$(printf '%q ' cd "$repo")$(printf '&& %q %q' "$PYTHON" "$repo/scripts/merge.py")
merge_cmd+=$(printf ' %q' --models "$RUNS/anneal_mix" "$RUNS/anneal_mix_cosine" --weights "${WEIGHTS%%,*}" \
  "${WEIGHTS#*,}" --out "$RUNS/merged")
submit merge "$anneal_a:$anneal_b" --nodes=1 --wrap "$merge_cmd" >/dev/null
echo "submitted: extend=$extend mix=$mix mix_cosine=$mix_cosine anneal=$anneal_a,$anneal_b"
