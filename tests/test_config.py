"""Presets, dotted overrides, validation, and the CLI's one-line errors."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sjax import cli, config
from sjax.config import ChatConfig, EvalConfig, MeshConfig, ModelConfig, RunConfig
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


# Every preset as the per-experiment preset files resolved before they became one file with
# sizes (owl_smoke.py, owl_quickstart.py, owl_qwen2_5_7b.py -> owl.py), eval.exact and
# eval.sampled (both true) written as eval.evaluators: dotted key -> value.
SNAPSHOT = json.loads((Path(__file__).parent / "presets_snapshot.json").read_text())


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict)
                   else {prefix + key: value})
    return out


@pytest.mark.parametrize("preset", sorted(SNAPSHOT))
def test_presets_resolve_exactly_as_before(preset):
    assert _flat(json.loads(config.to_json(config.load_preset(preset)))) == SNAPSHOT[preset]


def test_every_preset_is_snapshotted():
    assert sorted(config.preset_names()) == sorted(SNAPSHOT)


def test_preset_sizes(tmp_path):
    assert config.load_preset("owl:smoke").name == "owl_smoke"
    assert config.load_preset("owl:quickstart").name == "owl_quickstart"
    assert config.load_preset("owl:paper").name == "qwen2_5_7b_animals"
    sizes = "\\(owl:smoke \\| owl:quickstart \\| owl:paper \\| owl:paper14b\\)"
    with pytest.raises(SjaxError, match=f"config 'owl': name a size {sizes}"):
        config.load_preset("owl")
    with pytest.raises(SjaxError, match=f"config 'owl:huge': unknown size 'huge' {sizes}"):
        config.load_preset("owl:huge")
    with pytest.raises(SjaxError, match="config 'chat:smoke': chat has no sizes \\(use chat\\)"):
        config.load_preset("chat:smoke")
    with pytest.raises(SjaxError, match="presets: chat, code:smoke, code:cpu, code:paper, "
                                        "cot:smoke, cot:cpu, cot:paper, in_context:smoke, "
                                        "in_context:cpu, misalignment:smoke, misalignment:cpu, "
                                        "misalignment:paper, misalignment_cot:paper, mnist, owl:smoke, owl:quickstart, "
                                        "owl:paper, owl:paper14b, screen, sft, transmission"):
        config.load_preset("owl_smoke")  # the old per-size files are gone
    sized = tmp_path / "mine.py"  # a preset outside configs/, with sizes
    sized.write_text("from sjax.config import ChatConfig\nSIZES = ('a', 'b')\n"
                     "def get_config(size):\n    return ChatConfig(max_new_tokens=len(size))\n")
    assert config.load_preset(f"{sized}:b").max_new_tokens == 1
    with pytest.raises(SjaxError, match="unknown size 'c'"):
        config.load_preset(f"{sized}:c")


def test_evaluators_are_data():
    assert EvalConfig().evaluators == ("exact", "sampled") == config.DEFAULT_EVALUATORS
    cfg = config.apply_overrides(RunConfig(), ["eval.evaluators=exact"])
    assert cfg.eval.evaluators == ("exact",)
    assert config.apply_overrides(RunConfig(), ["eval.evaluators=sampled, exact"]
                                  ).eval.evaluators == ("sampled", "exact")
    for value, message in [("exact,logprob", "eval.evaluators: 'logprob' is not one of exact, "
                            "sampled"),
                           ("", "eval.evaluators: need at least one of exact, sampled"),
                           ("exact,exact", "eval.evaluators: duplicates in exact,exact")]:
        with pytest.raises(SjaxError, match=message):
            config.apply_overrides(RunConfig(), [f"eval.evaluators={value}"])


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


def test_overrides_are_checked_together_in_any_order_and_the_last_of_a_key_wins():
    keys = ["eval.number_prefixed=false", "eval.evaluators=misalignment", "targets=misaligned",
            "category=misalignment", "numbers.keep=5", "numbers.keep=7"]
    cfg = config.apply_overrides(config.RunConfig(), keys)
    assert (cfg.category, cfg.targets, cfg.numbers.keep) == ("misalignment", ("misaligned",), 7)
    assert cfg.eval.evaluators == ("misalignment",) and cfg.numbers.n_prompts == 30000
    with pytest.raises(SjaxError, match="targets: category=misalignment has one target"):
        config.apply_overrides(config.RunConfig(), keys[:2] + keys[3:])
    for pair in (["numbers.keep=5", "numbers=3"], ["numbers=3", "numbers.keep=5"],
                 ["name.x=3", "name=run"], ["name=run", "name.x=3"]):
        with pytest.raises(SjaxError, match="set either the key or its fields"):
            config.apply_overrides(config.RunConfig(), pair)
    with pytest.raises(SjaxError, match="unknown config key 'name.x': 'name' is a value"):
        config.apply_overrides(config.RunConfig(), ["name.x=3"])
    with pytest.raises(SjaxError, match=r"unknown config key 'numbers.kep' \(keys of numbers:"):
        config.apply_overrides(config.RunConfig(), ["numbers.kep=3"])
