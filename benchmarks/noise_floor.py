"""How fragile is an evaluation set? Top-1 agreement of the fp32 model with itself
under tiny Gaussian input noise, next to the softmax margins.

If input noise far below one 8-bit pixel step already moves many top-1 answers, an
int8 model cannot be expected to agree more than that; agreement targets must be read
against this floor (and top-5 overlap or a labelled metric preferred).

    python benchmarks/noise_floor.py [MODEL.onnx EVAL.npz INPUT_NAME]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import session  # noqa: E402

DEFAULT = Path.home() / ".cache" / "qtool" / "efficientnet-lite0"


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT / "model.onnx")
    data = sys.argv[2] if len(sys.argv) > 2 else str(DEFAULT / "eval.npz")
    name = sys.argv[3] if len(sys.argv) > 3 else "input"
    sess = session(model)
    x = np.load(data)[name]

    def logits(v):
        return np.concatenate([sess.run(None, {name: v[i:i + 32]})[0] for i in range(0, len(v), 32)])

    ref = logits(x)
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    top = np.sort(p, 1)
    print(f"{model}: {len(x)} samples; median top-1 probability {np.median(top[:, -1]):.3f}, "
          f"median margin to the second class {np.median(top[:, -1] - top[:, -2]):.3f}")
    rng = np.random.default_rng(0)
    for sigma in (0.0025, 0.005, 0.01, 0.02):
        noisy = logits(x + rng.normal(0, sigma, x.shape).astype(np.float32))
        print(f"input noise sigma {sigma:<6} top-1 agreement with clean fp32 {(noisy.argmax(1) == ref.argmax(1)).mean():.3f}")


if __name__ == "__main__":
    main()
