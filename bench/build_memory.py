"""Peak memory of `build` against the size of the teacher, measured in one run.

The builder streams (resident memory sampled every 2 ms): each output shard's header is written
first and every tensor appended as it is produced, so it should need about one layer's selected
experts whatever the number of layers and whatever --shard-size. This builds the same family at 4
and 16 layers with the default 1 GiB shard size (larger than the whole student here, so a
buffering writer would hold the entire output) and prints the peak resident memory above the
process baseline for each, next to the teacher's and student's sizes.

    python bench/build_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, threading, time, psutil, torch
from moe2dense_ray.convert.build import build
from moe2dense_ray.convert.plan import Plan, LayerPlan
import moe2dense_ray.convert.methods
src, dst, E, K, layers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
proc = psutil.Process()
base = peak = proc.memory_info().rss
done = False
def sample():
    global peak
    while not done:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=sample, daemon=True); t.start()
plan = Plan(model_type="qwen3_moe", num_experts=E, experts=K, groups=K, scoring="sf", grouping="none", scaling="uniform",
            layers=[LayerPlan(layer=i, scores=[1.0] * E, selected=list(range(K)), groups=[[e] for e in range(K)],
                              scales=[1.0 / K] * K) for i in range(layers)])
build(src, plan, dst, progress=False)
done = True; t.join()
print(json.dumps({"extra_mb": (peak - base) / 2**20}))
"""


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from tiny import make_tiny_moe  # the tests' tiny-model builder

    E, K, H, I = 32, 4, 512, 512
    rows = []
    for layers in (4, 16):
        with tempfile.TemporaryDirectory() as d:
            src, dst = os.path.join(d, "t"), os.path.join(d, "s")
            make_tiny_moe("qwen3_moe", src, hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=4,
                          num_hidden_layers=layers, mlp_only_layers=[], vocab_size=1024, scale=0.02)
            size_mb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 2**20
            out = subprocess.run([sys.executable, "-c", CHILD, src, dst, str(E), str(K), str(layers)],
                                 capture_output=True, text=True, check=True).stdout
            extra = json.loads(out.strip().splitlines()[-1])["extra_mb"]
            student_mb = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)) / 2**20
            rows.append((layers, size_mb, student_mb, extra))
    layer_experts_mb = E * 3 * H * I * 4 / 2**20
    print(f"one layer's experts: {layer_experts_mb:.0f} MB (fp32); selected per layer: {layer_experts_mb * K / E:.0f} MB")
    print("| layers | teacher (MB) | student, one shard (MB) | build peak above baseline (MB) | peak / student |")
    print("|---:|---:|---:|---:|---:|")
    for layers, size, student, extra in rows:
        print(f"| {layers} | {size:.0f} | {student:.0f} | {extra:.0f} | {extra / student:.2f} |")
    print(f"peak growth from 4 to 16 layers: {rows[1][3] / max(rows[0][3], 1e-9):.2f}x while the teacher grew "
          f"{rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
