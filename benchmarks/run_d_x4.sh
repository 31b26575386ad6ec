#!/usr/bin/env bash
# Run D on a 4-GPU machine (CALIB_SPEED.md): the shipped recipe's shape (E = 256, 768 x 512) at 1, 2 and 4
# ranks with the activations on the CPU, and at 1 and 4 ranks with them on the GPU; load, save and oneshot per
# point. Three calls (each inside the 10-minute limit), carrying the wheels the device lacks in .whl:
#
#   run(command="bash benchmarks/run_d_x4.sh cpu4", carry=[".whl"], kind="nvidia-h100-x4")
#   run(command="bash benchmarks/run_d_x4.sh cpu12", carry=[".whl"], kind="nvidia-h100-x4")
#   run(command="bash benchmarks/run_d_x4.sh gpu", carry=[".whl"], kind="nvidia-h100-x4")
#
# The first call also writes the 20.6 GB checkpoint (~30 s). `load` times load + linearize alone (dist_load.py).
set -euo pipefail
source benchmarks/device_env.sh /tmp/run_d_x4
point() {  # ranks, activations
  timeout 280 python3 benchmarks/calib_speed.py --experts 256 --samples 768 --seq-len 512 \
    --paths "fast:activations=$2" --nproc "$1" --out "$OUT/calib_speed_D_e256_768x512_$2_x$1.json" \
    > "$OUT/calib_$2_x$1.log" 2>&1 || true
  grep -v "it/s\]" "$OUT/calib_$2_x$1.log" | tail -4
}
case "${1:-cpu4}" in
  cpu4) point 4 cpu ;;
  cpu12) point 1 cpu; point 2 cpu ;;
  gpu) point 1 gpu; point 4 gpu ;;
  load)
    for n in 1 2 4; do
      timeout 170 python3 benchmarks/dist_load.py --experts 256 --nproc "$n" --modes mtpquant \
        --work /tmp/calib-speed --out "$OUT/dist_load_e256_x$n.json" 2>&1 | grep -E "^mtpquant:|Error" || true
    done ;;
esac
