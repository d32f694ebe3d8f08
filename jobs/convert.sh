#!/usr/bin/env bash
# Submit with:  ray job submit --working-dir . -- bash jobs/convert.sh
# Environment:  SRC DATA OUT (local paths or s3:// / gs:// URLs), K, SCORING, WORKERS.
# Ray sets RAY_ADDRESS for the job, so calibration actors land on the cluster's GPU workers.
set -euo pipefail
: "${SRC:?set SRC to the MoE checkpoint}" "${DATA:?set DATA to calibration text}" "${OUT:?set OUT}"
moe2dense calibrate "$SRC" --data "$DATA" --samples "${SAMPLES:-512}" --seq-len "${SEQ_LEN:-2048}" \
  --workers "${WORKERS:-4}" --full-stats --out "$OUT/stats"
moe2dense plan "$OUT/stats" --experts "${K:-8}" --scoring "${SCORING:-do-acp}" --out "$OUT/plan.json"
moe2dense build "$SRC" "$OUT/plan.json" --out "$OUT/dense"
