#!/usr/bin/env bash
# Issue #14's GPU check in one call (about 2-3 minutes on an H100/H200, at most ~5): graphed == eager updates
# for every algorithm, the learner bench (captured and eager), the pipeline bench in both rollout modes
# (workers mode only where Ray is installed), all in one JSON file. Installs nothing; needs python3 with torch
# (CUDA), numpy, h5py, tqdm, rich and pyyaml, which the lent machines' image has.
#
#   bash dromo_ray/bench/gpu_check.sh            # writes $OUT/gpu_check.json ($OUT: the device tool's folder)
#   OUT=/tmp bash dromo_ray/bench/gpu_check.sh --budget 200
set -euo pipefail
cd "$(dirname "$0")/../.."
out_dir="${OUT:-.}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
exec timeout 330 "${PYTHON:-python3}" -m dromo_ray.cli bench gpu --out "$out_dir/gpu_check.json" "$@"
