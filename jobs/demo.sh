#!/usr/bin/env bash
# ray job submit --working-dir . -- bash jobs/demo.sh
set -euo pipefail
moe2dense demo --out "${OUT:-runs/demo}" --workers "${WORKERS:-2}"
