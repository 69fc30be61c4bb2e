#!/usr/bin/env bash
# A Python environment that compiles for an NVIDIA H100 on a machine without a GPU, for
# bench/offline_gpu.py: jax / jaxlib 0.11.2 (the GPU machine's version) with its CUDA plugin and
# CUDA libraries (~5 GB), flax, optax and this project's other dependencies. jax 0.11 needs
# Python >= 3.12: PYTHON (default: the first python3.12 / python3.13 found) builds the venv.
#
#   bash bench/offline_gpu_env.sh                 # -> ~/.cache/t5x_lite/offline_gpu
#   OFFLINE_GPU_ENV=/somewhere bash bench/offline_gpu_env.sh
#   ~/.cache/t5x_lite/offline_gpu/bin/python bench/offline_gpu.py --config configs/llama_1b.yaml
#
# Nothing here needs a GPU or a driver: XLA compiles against a description of the chip
# (bench/offline_gpu.py's H100_TARGET) and nothing runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${OFFLINE_GPU_ENV:-$HOME/.cache/t5x_lite/offline_gpu}
# the first of python3.12 / python3.13 on PATH (or pyenv's installs) that runs: a pyenv shim is on PATH
# whether or not that version is the selected one
PY=${PYTHON:-}
if [[ -z $PY ]]; then
  for candidate in $(command -v python3.12 python3.13) ~/.pyenv/versions/3.1[23]*/bin/python3; do
    if "$candidate" -c "import sys; assert sys.version_info >= (3, 12)" 2>/dev/null; then PY=$candidate; break; fi
  done
fi
if [[ -z $PY ]]; then
  echo "offline_gpu_env: needs Python >= 3.12 (jax 0.11); set PYTHON=/path/to/python3.12" >&2
  exit 1
fi
"$PY" -m venv "$ENV"
"$ENV/bin/pip" install -q --upgrade pip
"$ENV/bin/pip" install -q "jax[cuda12]==0.11.2" "flax==0.12.10" "optax==0.2.8" "orbax-checkpoint==0.12.4" \
  chex sentencepiece pyyaml tqdm tensorboardX matplotlib
"$ENV/bin/pip" install -q --no-deps -e .
JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 "$ENV/bin/python" - <<'EOF'
import sys
sys.path.insert(0, "bench")
import offline_gpu
devices = offline_gpu.h100_devices()
print(f"offline_gpu_env: ready, compiling for {devices[0].device_kind if hasattr(devices[0], 'device_kind') else devices[0]}")
EOF
echo "offline_gpu_env: $ENV/bin/python bench/offline_gpu.py --help"
