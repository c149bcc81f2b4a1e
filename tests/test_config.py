"""Presets: every file in configs/ loads; unknown keys and wrong types name the key."""

from pathlib import Path

import pytest

from qtool.config import CalibrateOptions, Preset, QuantizeOptions, load_preset
from qtool.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.toml"))


def test_there_are_presets():
    assert any(p.name == "cnn-cpu.toml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads(path):
    preset = load_preset(path)
    assert isinstance(preset, Preset)


@pytest.mark.parametrize("text, needle", [
    ("[quantize]\nper_chanel = true\n", "quantize.per_chanel"),
    ("[quantise]\n", "[quantise]"),
    ("[quantize]\nper_channel = 'yes'\n", "quantize.per_channel must be bool"),
    ("[calibrate]\nmethod = 'kl'\n", "calibrate.method must be one of"),
    ("[calibrate]\nbatch_size = 0\n", "calibrate.batch_size"),
    ("[quantize]\nexclude = 'Conv'\n", "quantize.exclude must be a list"),
    ("not toml = = \n", "not valid TOML"),
])
def test_bad_presets(tmp_path, text, needle):
    p = tmp_path / "p.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_preset(p)
    assert needle in str(info.value)


def test_cnn_preset_values():
    preset = load_preset(next(p for p in CONFIGS if p.name == "cnn-cpu.toml"))
    assert preset.quantize == QuantizeOptions(per_channel=True, activation_type="uint8")
    assert preset.calibrate.method == "minmax"
    assert preset.eval.threads == 2


def test_options_validate_directly():
    with pytest.raises(ConfigError):
        CalibrateOptions(percentile=20)
    with pytest.raises(ConfigError):
        QuantizeOptions(activation_type="int4")


def test_preset_precision_overrides(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[quantize]\nprecision = ["/head/Conv=fp32", "Gemm=int16"]\nweight_type = "uint8"\n')
    q = load_preset(p).quantize
    assert [(k, v.label) for k, v in q.overrides()] == [("/head/Conv", "fp32"), ("Gemm", "int16")]
    assert q.weight_type == "uint8"
    p.write_text('[quantize]\nprecision = ["Gemm=int7"]\n')
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_preset(p)
