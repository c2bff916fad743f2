#!/usr/bin/env bash
# GPU check of medcl on one CUDA GPU, in under 9 minutes (docs/benchmarks.md "GPU check"):
#   1. the CUDA tests (tests/test_cuda.py, marker `cuda`): an AMP step in fp16 and bf16 for every
#      registered method, channels-last inputs, a one-process nccl run, `medcl predict` on CUDA vs CPU;
#   2. `arco` (sampler sg) on ACDC, 3 labelled patients, paper preset (templates/acdc_paper.yaml),
#      pretraining + fine-tuning in a 6-minute budget (benchmarks/gpu_check.py: a timing probe sets the
#      steps); prints iterations per second, val Dice and peak GPU memory.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine (python with medcl on PATH)
#   bash benchmarks/gpu_check.sh --dry-run            # the same path on the CPU: tests skip, synthetic data,
#                                                     # 32 px, a few steps (tests/test_gpu_check.py runs it)
#   bash benchmarks/gpu_check.sh --out DIR --budget 360 --acdc PATH   # other arguments go to gpu_check.py
#
# ACDC is found at --acdc, $MEDCL_SHARED_DATA/acdc or ../shared/data/acdc. PYTHON picks the interpreter
# (default: python on PATH). Exit 2 without CUDA (unless --dry-run); a failing CUDA test does not stop the
# benchmark, the exit code is then the benchmark's if it failed, else pytest's.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, even where another copy is installed
py="${PYTHON:-python}"

dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1; args+=("$arg") ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

if ! command -v "$py" >/dev/null 2>&1; then
  echo "error: '$py' not found on PATH" >&2
  echo "hint: activate the environment where medcl is installed, or set PYTHON=/path/to/python" >&2
  exit 2
fi
if [ "$dry_run" -eq 0 ] && ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA GPU is visible to torch ($("$py" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo "torch not importable"))" >&2
  echo "hint: run this on a machine with an NVIDIA GPU and a CUDA build of torch, or try the same path on the CPU with --dry-run" >&2
  exit 2
fi

start=$(date +%s)
echo "== gpu_check 1/2: CUDA tests (pytest -m cuda tests/test_cuda.py)$([ "$dry_run" -eq 1 ] && echo ', dry run: they skip without CUDA')"
tests_rc=0
"$py" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py || tests_rc=$?  # the benchmark runs anyway
echo "== gpu_check 2/2: arco on ACDC, paper preset$([ "$dry_run" -eq 1 ] && echo ', dry run: CPU, synthetic data')"
bench_rc=0
"$py" benchmarks/gpu_check.py "${args[@]}" || bench_rc=$?
echo "gpu_check: done in $(( $(date +%s) - start )) s; CUDA tests exit $tests_rc, arco benchmark exit $bench_rc"
if [ "$bench_rc" -ne 0 ]; then exit "$bench_rc"; fi
exit "$tests_rc"
