#!/usr/bin/env bash
# The speed benchmark on a CUDA GPU: every client actor gets a fraction of the
# GPU, the ServerApp distils on it too, and the GPU's memory in use is sampled
# every 0.5 s (nvidia-smi) and its peak printed after the per-method table.
#
#   bash benchmarks/gpu.sh --data-path data/mnist-12k                # FedAvg vs Mosaic, seed 0
#   bash benchmarks/gpu.sh --data-path data/mnist-12k --seeds 0 1 2 --methods fedavg mosaic feddf
#   bash benchmarks/gpu.sh --device cpu                             # CI-sized, on the CPU
#
# Options: --device cuda|cpu (default cuda), --gpus-per-client F (default 0.1,
# i.e. ten actors share the GPU); everything else goes to benchmarks/speed.py.
# With --device cpu the run is the CI-sized --smoke setting and no GPU is used.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
device=cuda
gpus=0.1
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --gpus-per-client) gpus="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ "$device" == "cpu" ]]; then
  exec python "$here/speed.py" --smoke --device cpu --methods fedavg mosaic "${args[@]+"${args[@]}"}"
fi

if ! command -v nvidia-smi > /dev/null; then
  echo "gpu.sh: nvidia-smi not found; use --device cpu on a machine without a GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
samples="$(mktemp)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$samples" &
sampler=$!
trap 'kill "$sampler" 2> /dev/null || true; rm -f "$samples"' EXIT
python "$here/speed.py" --device cuda --gpus-per-client "$gpus" "${args[@]+"${args[@]}"}"
kill "$sampler" 2> /dev/null || true
wait "$sampler" 2> /dev/null || true
echo "peak GPU memory in use (all processes, MiB): $(sort -n "$samples" | tail -1)"
