"""qtool on a model over 2 GB: wall time and peak RSS of every command, per model size.

    python benchmarks/large_model.py [--model-dir DIR] [--dim 2048] [--blocks 17] [--keep DIR]
                                     [--pythonpath TREE]

Builds the model with ``make_large_model.py`` if it is missing (default
``~/.cache/qtool/large/``: 34 MatMuls, 2.28 GB of float32 weights in external data), then runs,
each as its own ``qtool`` process through the CLI:

1. ``calibrate`` on ``calib.npz`` (8 samples of 16x2048),
2. ``quantize --table`` (static QDQ), 3. ``quantize --table --format qoperator``,
4. ``quantize --mode dynamic``,
5. ``eval`` of the fp32 model against the static and 6. the dynamic model (``eval.npz``,
   batch 1, 3 timed runs after 5 warm-up runs).

Peak RSS is each process's own (``os.wait4``'s rusage), printed in MiB and as a multiple of
the model's size on disk (model file + data file). ``--pythonpath TREE`` runs another qtool
source tree (e.g. ``git archive <commit> qtool | tar -x -C TREE``) for before/after figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_large_model  # noqa: E402

MiB = 1024**2


def run_step(args: list[str], env: dict, cwd: Path) -> tuple[int, float, int, str]:
    """(exit code, wall seconds, peak RSS in bytes, output) of one qtool process, run in ``cwd``
    (``python -c`` puts the current folder first on sys.path: not a qtool checkout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "from qtool.cli import main; main()", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return proc.returncode, wall, usage.ru_maxrss * 1024, out.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=str(make_large_model.DEFAULT_DIR))
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=17)
    ap.add_argument("--keep", help="write the table and quantized models here (default: a temporary folder)")
    ap.add_argument("--pythonpath", help="qtool source tree to run instead of this checkout")
    ap.add_argument("--steps", default="calibrate,static,qoperator,dynamic,eval-static,eval-dynamic")
    args = ap.parse_args(argv)

    model = make_large_model.ensure(args.model_dir, dim=args.dim, blocks=args.blocks)
    d = model.parent
    size = make_large_model.model_bytes(model)
    tree = Path(args.pythonpath or HERE.parent).resolve()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qtool-large-"))
    work.mkdir(parents=True, exist_ok=True)
    table, static, qop, dyn = (work / n for n in ("table.json", "static.onnx", "qoperator.onnx", "dynamic.onnx"))
    steps = {
        "calibrate": ["calibrate", str(model), "--data", str(d / "calib.npz"), "-o", str(table)],
        "static": ["quantize", str(model), "--table", str(table), "-o", str(static)],
        "qoperator": ["quantize", str(model), "--table", str(table), "--format", "qoperator", "-o", str(qop)],
        "dynamic": ["quantize", str(model), "--mode", "dynamic", "-o", str(dyn)],
        "eval-static": ["eval", str(model), str(static), "--data", str(d / "eval.npz"), "--batch-size", "1",
                        "--repeats", "3"],
        "eval-dynamic": ["eval", str(model), str(dyn), "--data", str(d / "eval.npz"), "--batch-size", "1",
                         "--repeats", "3"],
    }
    print(f"model {model}: {size:,} bytes ({size / 1024**3:.2f} GiB) with its data file; "
          f"qtool from {tree}")
    print(f"{'step':14s} {'exit':>4s} {'wall s':>7s} {'peak RSS MiB':>13s} {'RSS/model':>9s}  last line")
    rows = []
    for name in args.steps.split(","):
        code, wall, rss, out = run_step(steps[name], env, work)
        lines = [line for line in out.splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if line.startswith(("wrote", "error"))), lines[-1] if lines else "")
        if name.startswith("eval"):
            last = next((line.strip() for line in lines if "cosine" in line), last)
        rows.append((name, code, wall, rss))
        print(f"{name:14s} {code:4d} {wall:7.1f} {rss / MiB:13,.0f} {rss / size:9.2f}  {last[:110]}", flush=True)
    if not args.keep:
        for p in work.glob("*"):
            p.unlink()
        work.rmdir()
    return 0 if all(code == 0 for _, code, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
