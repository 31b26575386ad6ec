#!/usr/bin/env bash
# Run D (CALIB_SPEED.md): baseline vs fast (activations on the CPU, as before run D) vs fast with the
# activations on the GPU vs that plus overlapped weight copies, E = 64, 64 x 2048, one GPU, one call. Needs the
# wheels that the device lacks (llmcompressor 0.14.0.1, compressed-tensors 0.19.0 and what they import) in .whl.
#
#   run(command="CUDA_VISIBLE_DEVICES=0 bash benchmarks/run_d.sh", carry=[".whl"])
#
# Run D's results were recorded with the path "fast" when the shipped recipe still said `activations: cpu`;
# the JSON's `activations_on` says where the activations were.
set -euo pipefail
source benchmarks/device_env.sh /tmp/run_d
python3 benchmarks/calib_speed.py --experts 64 --samples 64 --seq-len 2048 \
  --paths "baseline,fast:activations=cpu,fast:activations=gpu,fast:activations=gpu+overlap_weights=true" \
  --out "$OUT/calib_speed_D_e64_64x2048.json" 2>&1 | tee "$OUT/run_d.log" | grep -v "it/s\]" || true
