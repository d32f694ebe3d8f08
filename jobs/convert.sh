#!/usr/bin/env bash
# calibrate -> plan -> build as one Ray job. Submit with:
#   ray job submit --working-dir . -- bash jobs/convert.sh
# Environment: SRC DATA OUT (local paths or s3:// / gs:// URLs), K, SCORING, WORKERS, SAMPLES, SEQ_LEN.
# Without SRC it converts the bundled teacher (16 experts) on its calibration sample.
# Ray sets RAY_ADDRESS for the job, so the calibration actors land on the cluster's workers.
set -euo pipefail
if [ -z "${SRC:-}" ]; then
  SRC=moe2dense_ray/assets/teacher-qwen3moe DATA=moe2dense_ray/assets/calibration.jsonl
  : "${OUT:=runs/convert}" "${K:=4}" "${SAMPLES:=64}" "${SEQ_LEN:=256}" "${WORKERS:=2}"
fi
: "${DATA:?set DATA to calibration text}" "${OUT:?set OUT}"
moe2dense calibrate "$SRC" --data "$DATA" --samples "${SAMPLES:-512}" --seq-len "${SEQ_LEN:-2048}" \
  --workers "${WORKERS:-4}" --full-stats --out "$OUT/stats"
moe2dense plan "$OUT/stats" --experts "${K:-8}" --scoring "${SCORING:-do-acp}" --out "$OUT/plan.json"
moe2dense build "$SRC" "$OUT/plan.json" --out "$OUT/dense"
