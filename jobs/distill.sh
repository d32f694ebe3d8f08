#!/usr/bin/env bash
# Distillation as a Ray job: teacher actors and Ray Train workers land on the cluster's nodes.
#   ray job submit --working-dir . -- bash jobs/distill.sh
# Environment: CONFIG (a distill YAML, default jobs/distill.yaml), RESUME (a RUN to continue).
# With the default config it first converts the bundled teacher (jobs/convert.sh) if needed.
set -euo pipefail
if [ -n "${RESUME:-}" ]; then
  exec moe2dense distill --resume "$RESUME"
fi
CONFIG="${CONFIG:-jobs/distill.yaml}"
if [ "$CONFIG" = jobs/distill.yaml ] && [ ! -e runs/convert/dense/config.json ]; then
  bash jobs/convert.sh
fi
moe2dense distill --config "$CONFIG"
