#!/usr/bin/env bash
# Issue 11's benchmark on one lent H200, one call: a GLM-5.2-shaped checkpoint (1 dense + 4 MoE layers, 128
# experts, ~41 GB) written on the device, the disk's read and write floor, `quantize --engine memory` and
# `--engine stream` on it (shipped recipe w4a16-asym-g128, 768 x 512 tokens of the tiny-local texts), then the
# stream engine SIGKILLed during layer 2 and resumed, its output hashes compared with the uninterrupted run's.
# Needs the wheels the device lacks in .whl (llmcompressor 0.14.0.1, compressed-tensors 0.19.0, datasets 5.2.0,
# dill, multiprocess, pydantic(-core), annotated-types, typing-inspection, typing-extensions, loguru, auto-round):
#
#   run(command="bash benchmarks/run_stream.sh", carry=[".whl"], timeout_s=600)
#
# Determinism of the GPU run and of resume, one call (32 experts, 1 dense + 3 MoE layers: three stream runs fit
# the 10 minutes; the stream engine's run twice uninterrupted, then killed at layer 2 and resumed, every file's
# sha256 and each layer's shard/activation hashes compared with the first run; `determinism` and `kill` in the
# JSON):
#
#   run(command="EXPERTS=32 MOE_LAYERS=3 PHASES=gen,stream,kill REPEATS=2 TAG=h200_determinism bash benchmarks/run_stream.sh", carry=[".whl"], timeout_s=600)
#
# The write path of engine stream-3 (activations streamed, none after the last layer, reused pinned read buffers;
# benchmarks/STREAM_H200.md "The write path"), one call, ~7-8 minutes: both engines side by side, the read/write
# floor, per-layer compute vs read vs write (shard and activations apart), I/O hidden, peak RSS and GPU memory,
# kill during layer 2 + resume with the output hashes compared:
#
#   run(command="EXPERTS=32 MOE_LAYERS=3 PHASES=gen,floor,memory,stream,kill TAG=h200_perf bash benchmarks/run_stream.sh", carry=[".whl"], timeout_s=600)
#
# The same with MTPQUANT_STREAM_DETERMINISTIC=0 in front: the engine without torch's deterministic algorithms
# (to show what they fix, and what they cost).
#
# The reader's threads (2026-12-07), one call: the disk floor, the engine's reader alone at 1, 2, 4 and 8 threads
# (interleaved, page cache dropped each pass), then the stream engine with 1 and with 4 read threads:
#
#   run(command="EXPERTS=96 PHASES=gen,floor,reads,stream STREAM_READ_THREADS=1,4 TAG=h200_readers bash benchmarks/run_stream.sh", carry=[".whl"], timeout_s=600)
#
# Several GPUs (issue 13's run: needs a kind with several GPUs; one node, torchrun --standalone), three calls on
# one warm machine (the checkpoint stays in WORK between them): the one-GPU point, then each split on all GPUs,
# the expert split also SIGKILLed during layer 2 and resumed under torchrun:
#
#   run(command="EXPERTS=96 PHASES=gen,floor,stream TAG=x1 bash benchmarks/run_stream.sh", kind="nvidia-h200-x8", carry=[".whl"], timeout_s=600)
#   run(command="EXPERTS=96 NPROC=8 SPLIT=experts PHASES=stream,kill TAG=x8_experts bash benchmarks/run_stream.sh", carry=[".whl"], timeout_s=600)
#   run(command="EXPERTS=96 NPROC=8 SPLIT=layers PHASES=stream TAG=x8_layers bash benchmarks/run_stream.sh", carry=[".whl"], timeout_s=600)
#
# Environment: PHASES (default gen,floor,memory,stream,kill), BUDGET_S (default 540: a phase that would not end
# inside it is skipped and recorded), EXPERTS (0: 128 experts if the disk holds the run, else 96, 64, 32), REPEATS (1; interleaved), SMALL=1 (fixture dimensions,
# to check the script on a CPU), REF_JSON (an earlier result whose stream hashes the kill phase compares with),
# WORK (default /tmp/stream-bench: kept between calls while the machine stays warm, so a second call reuses the
# checkpoint), READ_SWEEP (the reads phase's thread counts, default 1,2,4,8), STREAM_READ_THREADS (one stream run
# per value, interleaved), NPROC and SPLIT (the stream phases under torchrun). Results:
# $OUT/stream_${TAG:-h200}.json, $OUT/stream_bench.log, $OUT/env.txt.
set -uo pipefail
source benchmarks/device_env.sh /tmp/stream-bench-out
export TOKENIZERS_PARALLELISM=false
{
  date -u; uname -a; python3 --version; nproc; free -g; df -h / /tmp "$PWD"
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|pyarrow|fsspec|typing.extensions|huggingface.hub|safetensors|numpy|pandas|accelerate|tokenizers|llmcompressor|compressed.tensors|datasets|pydantic|auto.round) "
  ls -l /usr/bin/time
  nvidia-smi 2>&1 | head -20
  python3 -c "import llmcompressor, compressed_tensors, datasets, auto_round, pydantic; print('imports ok', llmcompressor.__version__, compressed_tensors.__version__, datasets.__version__, pydantic.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
grep -q "imports ok" "$OUT/env.txt" || { echo "the carried wheels do not import: see env.txt"; exit 3; }
python3 benchmarks/stream_bench.py --out "$OUT" --tag "${TAG:-h200}" --work "${WORK:-/tmp/stream-bench}" \
  --phases "${PHASES:-gen,floor,memory,stream,kill}" --budget-s "${BUDGET_S:-540}" --experts "${EXPERTS:-0}" --moe-layers "${MOE_LAYERS:-4}" \
  --repeats "${REPEATS:-1}" ${SMALL:+--small --samples 16 --seq-len 128 --write-floor-gib 0.25} \
  ${REF_JSON:+--ref-json "$REF_JSON"} ${READ_SWEEP:+--read-sweep "$READ_SWEEP"} \
  ${STREAM_READ_THREADS:+--stream-read-threads "$STREAM_READ_THREADS"} --nproc "${NPROC:-1}" --split "${SPLIT:-layers}" \
  2>&1 | tee "$OUT/stream_bench.log"
