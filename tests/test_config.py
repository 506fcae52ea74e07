"""Presets, dotted overrides, validation, and the CLI's one-line errors."""

import dataclasses
import subprocess
import sys

import pytest

from sjax import cli, config
from sjax.config import ChatConfig, MeshConfig, ModelConfig
from sjax.errors import SjaxError


def test_overrides_parse_by_type():
    cfg = config.apply_overrides(ChatConfig(), [
        "model.name=qwen2.5-coder-0.5b-instruct", "mesh.data=2", "temperature=0.5",
        "model.dtype=bfloat16", "max_new_tokens=7"])
    assert cfg.model.name == "qwen2.5-coder-0.5b-instruct"
    assert cfg.mesh == MeshConfig(data=2)
    assert cfg.temperature == 0.5 and cfg.max_new_tokens == 7
    assert cfg.model.dtype == "bfloat16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_parse_value_types():
    assert config.parse_value("k", bool, "true") is True
    assert config.parse_value("k", bool, "0") is False
    assert config.parse_value("k", tuple[str, ...], "owl, eagle") == ("owl", "eagle")
    assert config.parse_value("k", tuple[int, ...], "1,2") == (1, 2)
    assert config.parse_value("k", int | None, "none") is None
    with pytest.raises(SjaxError, match="'k': expected true/false"):
        config.parse_value("k", bool, "maybe")


@pytest.mark.parametrize("override, message", [
    ("model.nme=x", "unknown config key 'model.nme' \\(keys of model: name, path"),
    ("nope=1", "unknown config key 'nope'"),
    ("max_new_tokens=abc", "'max_new_tokens': expected an integer, got 'abc'"),
    ("temperature=hot", "'temperature': expected a number"),
    ("model=x", "'model' is a section"),
    ("model.name.x=1", "'name' is a value, not a section"),
    ("model.dtype=float8", "model.dtype: 'float8' is not one of float32, bfloat16"),
    ("max_new_tokens=0", "max_new_tokens: must be > 0"),
    ("mesh.fsdp=0", "mesh.fsdp: must be a positive size or -1"),
    ("justakey", "expected key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(SjaxError, match=message):
        config.apply_overrides(ChatConfig(), [override])


def test_presets(tmp_path):
    cfg = config.load_preset("chat")
    assert isinstance(cfg, ChatConfig) and cfg.model == ModelConfig(
        name="qwen2.5-coder-0.5b-instruct")
    with pytest.raises(SjaxError, match="no such preset file .*presets: chat"):
        config.load_preset("does_not_exist")
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return 1 / 0\n")
    with pytest.raises(SjaxError, match="bad.py: failed to load: ZeroDivisionError"):
        config.load_preset(str(bad))


def test_cli_prints_one_line_and_exits_2(capsys):
    assert cli.main(["chat", "model.nme=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sjax: error: unknown config key 'model.nme' (keys of model: name, path, init, "
                   "param_dtype, dtype, remat)"]
    assert cli.main(["chat", "chat", "model.path=/no/such/file.gguf"]) == 2
    assert "model.path: /no/such/file.gguf: no such file" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "sjax", "info", "mesh.data=3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "sjax: error: mesh: data*fsdp*tensor = 3 but there are 8 devices")
