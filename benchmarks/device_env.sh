# Sourced by the run_*.sh scripts on a lent GPU machine: the wheels the device lacks (carried in .whl:
# llmcompressor 0.14.0.1, compressed-tensors 0.19.0 and what they import) on PYTHONPATH with this checkout's
# src, an output folder ($OUT, or the default the script names), and the GPU model recorded beside the results.
# Usage: source benchmarks/device_env.sh DEFAULT_OUT
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-$1}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
