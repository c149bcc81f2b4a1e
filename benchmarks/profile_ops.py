"""Where a model's time goes, per op type, from onnxruntime's own profiler (2 threads).

    python benchmarks/profile_ops.py MODEL.onnx [MODEL2.onnx ...] --data FEEDS.npz [--runs 3]

Prints each op type's share of kernel time; use it to say which nodes cost what when a
quantized model does not speed up as expected.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict

import numpy as np
import onnxruntime as ort


def profile(path: str, feeds: dict, runs: int) -> tuple[float, dict[str, float]]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "qtool_profile")
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    for _ in range(runs):
        sess.run(None, feeds)
    per_op: dict[str, float] = defaultdict(float)
    trace = sess.end_profiling()
    with open(trace) as f:
        for event in json.load(f):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                per_op[event["args"]["op_name"]] += event["dur"]
    os.unlink(trace)
    total = sum(per_op.values())
    return total / runs / 1000.0, {k: v / total for k, v in per_op.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", required=True, help=".npz with one batch keyed by input name")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    feeds = dict(np.load(args.data))
    for path in args.models:
        ms, shares = profile(path, feeds, args.runs)
        print(f"{path}: {ms:.1f} ms of kernel time per run")
        for op, share in sorted(shares.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {op:<28} {share:6.1%}")


if __name__ == "__main__":
    main()
