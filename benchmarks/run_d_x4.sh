#!/usr/bin/env bash
# Run D on nvidia-h100-x4 (CALIB_SPEED.md): load + linearize under torchrun at 1, 2 and 4 ranks with the
# fixes in mtpquant.ranks, then the fast path on 4 GPUs at the shipped recipe's shape (E = 256, 768 x 512).
# Two calls (each well inside the 10-minute limit), carrying the wheels the device lacks in .whl:
#
#   run(command="bash benchmarks/run_d_x4.sh load", carry=[".whl"], kind="nvidia-h100-x4")
#   run(command="bash benchmarks/run_d_x4.sh calib", carry=[".whl"], kind="nvidia-h100-x4")
set -euo pipefail
source benchmarks/device_env.sh /tmp/run_d_x4
case "${1:-load}" in
  load)
    for n in 1 2 4; do
      timeout 170 python3 benchmarks/dist_load.py --experts 256 --nproc "$n" --modes mtpquant \
        --work /tmp/calib-speed --out "$OUT/dist_load_h100x4_e256_x$n.json" 2>&1 | grep -E "^mtpquant:|Error" || true
    done ;;
  calib)
    timeout 560 python3 benchmarks/calib_speed.py --experts 256 --samples 768 --seq-len 512 --paths fast \
      --nproc 4 --out "$OUT/calib_speed_h100x4_D_e256_768x512.json" 2>&1 | tee "$OUT/calib_x4.log" | grep -v "it/s\]" | tail -40 ;;
esac
