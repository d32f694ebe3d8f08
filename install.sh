#!/usr/bin/env bash
# Installs moe2dense-ray into ./.venv (or the active virtual environment).
#
# torch is chosen before anything else so that no dependency drags in the wrong build:
#   - a torch that already imports is kept (a GPU cluster's CUDA build stays as it is);
#   - with an NVIDIA driver present, pip's default (CUDA) build is installed;
#   - on a CPU-only machine the CPU build is installed (a plain `pip install torch` would pull
#     several GB of CUDA libraries that can never run there).
# Usage: ./install.sh [--cloud] [--test]
#   --cloud  the object-store filesystems (s3fs, gcsfs: the `cloud` extra) for s3:// and gs:// paths;
#            every cluster node needs it (clusters/*.yaml and the KubeRay image pass it)
#   --test   the test dependencies
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

extras=()
for arg in "$@"; do
  case "$arg" in
    --cloud) extras+=(cloud) ;;
    --test) extras+=(test) ;;
    *) echo "install: unknown option $arg (usage: ./install.sh [--cloud] [--test])" >&2; exit 2 ;;
  esac
done

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  PY="$PWD/.venv/bin/python"
else
  PY="$VIRTUAL_ENV/bin/python"
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if "$PY" -c "import torch" 2>/dev/null; then
  echo "install: keeping torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install: NVIDIA GPU found, installing the CUDA build of torch"
  "${PIP[@]}" "torch==${TORCH_VERSION}"
else
  echo "install: no GPU, installing the CPU build of torch ${TORCH_VERSION}"
  "${PIP[@]}" "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
    || "${PIP[@]}" "torch==${TORCH_VERSION}" --index-url "$TORCH_CPU_INDEX" \
    || "${PIP[@]}" "torch==${TORCH_VERSION}"
fi

extra=""
[ ${#extras[@]} -gt 0 ] && extra="[$(IFS=,; echo "${extras[*]}")]"
"${PIP[@]}" -e ".${extra}"

# On a machine without a GPU, DeepSpeed's training workers communicate through a C++ op that torch
# compiles on first use (~35 s on 2 cores): built here, once, into the cache the workers read
# (TORCH_EXTENSIONS_DIR, or torch's default), so that the first `moe2dense distill` or demo does not
# sit at "starting the training workers" while a compiler runs.
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "install: building DeepSpeed's CPU communication op (once)"
  DS_ACCELERATOR=cpu "$PY" -c 'from moe2dense_ray.distill.worker import build_cpu_op; build_cpu_op()' \
    >/dev/null 2>&1 || echo "install: could not build it now; the first training run will"
fi
echo "install: done ($("$PY" -c 'import torch, transformers, ray; print(f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}")'))"
