#!/usr/bin/env bash
# ray job submit --runtime-env jobs/runtime_env.yaml -- bash jobs/demo.sh   (writes /tmp/moe2dense/demo on the head)
set -euo pipefail
moe2dense demo --out "${OUT:-/tmp/moe2dense/demo}" --workers "${WORKERS:-2}"
