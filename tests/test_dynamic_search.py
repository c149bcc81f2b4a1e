"""--dynamic with the accuracy search is one clear error: the search plans its candidates
without the dynamic node set, so the nodes asked for would silently stay static."""

import numpy as np
from click.testing import CliRunner

import models
from qtool.cli import main


def test_dynamic_with_the_search_is_refused(tmp_path):
    m = models.matmul_mlp()
    models.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **models.random_inputs(m, 16))
    r = CliRunner().invoke(main, ["quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"), "--data",
                                  str(tmp_path / "d.npz"), "--dynamic", "MatMul", "--eval-data",
                                  str(tmp_path / "d.npz"), "--min-snr", "10", "--no-speed"])
    assert r.exit_code == 2 and "--dynamic is not combined with the accuracy search" in r.output, r.output
    assert "Traceback" not in r.output and not (tmp_path / "q.onnx").exists()
