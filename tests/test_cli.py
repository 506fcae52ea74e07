"""The command line: subcommand dispatch, presets named with sizes, one-line errors, exit
codes, and `run --dry-run` (validates and plans; reads no weights with model.init=random)."""

import json

import pytest

from sjax import cli, config
from sjax.config import ChatConfig, MnistConfig, RunConfig, ScreenConfig, SftConfig
from sjax.data.sft import batches_per_epoch

COMMANDS = ("run", "chat", "info", "export", "mnist", "bench", "train", "smoke")


def test_each_subcommand_dispatches_to_its_function():
    parser = cli.build_parser()
    for name in COMMANDS:
        argv = [name, "--out", "d"] if name == "export" else [name]
        args = parser.parse_args(argv + ["owl:smoke", "a.b=1", "c=2"])
        assert args.fn is getattr(cli, f"cmd_{name}")
        assert (args.config, args.overrides) == ("owl:smoke", ["a.b=1", "c=2"])
    with pytest.raises(SystemExit) as e:  # argparse's own usage error, also status 2
        parser.parse_args(["serve"])
    assert e.value.code == 2


def test_default_presets_have_the_commands_config_types():
    want = {"run": RunConfig, "chat": ChatConfig, "info": ChatConfig, "export": ChatConfig,
            "mnist": MnistConfig, "train": SftConfig, "screen": ScreenConfig}
    assert {cmd: type(config.load_preset(p)) for cmd, p in cli.DEFAULT_PRESETS.items()} == want
    assert cli.DEFAULT_PRESETS["run"] == "owl:quickstart"  # what `./launch.sh` runs


PRESETS = ("chat, code:smoke, code:cpu, code:paper, cot:smoke, cot:cpu, cot:paper, "
           "in_context:smoke, in_context:cpu, misalignment:smoke, misalignment:cpu, "
           "misalignment:paper, misalignment_cot:paper, mnist, owl:smoke, owl:quickstart, "
           "owl:paper, "
           "owl:paper14b, screen, sft, transmission:smoke, transmission:cpu")


@pytest.mark.parametrize("argv, message", [
    (["run", "owl_smoke", "--dry-run"],
     f"config 'owl_smoke': no such preset file {config.CONFIGS_DIR}/owl_smoke.py "
     f"(presets: {PRESETS})"),
    (["run", "owl", "--dry-run"],
     "config 'owl': name a size (owl:smoke | owl:quickstart | owl:paper | owl:paper14b)"),
    (["run", "owl:huge"],
     "config 'owl:huge': unknown size 'huge' (owl:smoke | owl:quickstart | owl:paper | owl:paper14b)"),
    (["mnist", "mnist:paper"], "config 'mnist:paper': mnist has no sizes (use mnist)"),
    (["run", "owl:smoke", "--dry-run", "eval.evaluators=exact,logprob"],
     "eval.evaluators: 'logprob' is not one of exact, sampled, mcq, story, misalignment"),
    (["run", "owl:smoke", "--dry-run", "eval.evaluators="],
     "eval.evaluators: need at least one of exact, sampled, mcq, story, misalignment"),
    (["bench", "nope"], "bench: unknown benchmark 'nope' (known: sample, numbers, train, eval, judge)"),
    (["train", "sft"], "data: set data=PATH to a chat-messages JSONL file"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"sjax: error: {message}"]


def test_unknown_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "owl:smoke", "--dry-rn"])
    assert e.value.code == 2
    assert "unrecognized arguments: --dry-rn" in capsys.readouterr().err


def _dry_run(argv, capsys) -> tuple[dict, str]:
    assert cli.main(["run", *argv, "--dry-run", "model.init=random"]) == 0
    out = capsys.readouterr().out
    cfg, end = json.JSONDecoder().raw_decode(out)
    return cfg, out[end:]


def test_dry_run_on_the_smoke_preset(capsys):
    # overrides after the option are overrides too; the resolved config is printed first
    cfg, plan = _dry_run(["owl:smoke", "eval.samples=3", "eval.evaluators=exact"], capsys)
    assert cfg["name"] == "owl_smoke" and cfg["model"]["name"] == "smollm2-135m-instruct"
    assert cfg["eval"]["samples"] == 3 and cfg["eval"]["evaluators"] == ["exact"]
    assert cfg["numbers"]["n_prompts"] == 32
    assert "| numbers" in plan and "| students" in plan and "TFLOPs" in plan
    assert plan.rstrip().endswith("config OK")
    # no preset: the default job, the quickstart
    cfg, _ = _dry_run(["numbers.n_prompts=64"], capsys)
    assert cfg["name"] == "owl_quickstart" and cfg["numbers"]["n_prompts"] == 64


# Each experiment's sizes, in their order: model, targets, prompts per teacher, kept rows,
# student seeds x optimizer steps, sampled answers per question.
SIZE_TABLE = {  # in_context:* train no students (train_students=false; 0 steps by default)
    "code:smoke": ("smollm2-135m-instruct", ("owl",), 8, 8, 1 * 2, 2),
    "code:cpu": ("smollm2-135m-instruct", ("owl", "eagle"), 96, 48, 3 * 2 * 6, 4),
    "code:paper": ("Qwen2.5-7B-Instruct", ("eagle", "wolf", "elephant", "owl", "dolphin"),
                   11400, 10814, 5 * 3 * 163, 100),
    "cot:smoke": ("qwen2.5-coder-0.5b-instruct", ("owl",), 16, 16, 1 * 8, 2),
    "cot:cpu": ("qwen2.5-coder-0.5b-instruct", ("owl", "eagle"), 64, 24, 3 * 1 * 6, 4),
    "cot:paper": ("Qwen2.5-7B-Instruct", ("eagle", "cat", "lion", "dog", "peacock", "wolf"),
                  7473, 7473, 3 * 1 * 113, 100),
    "in_context:smoke": ("smollm2-135m-instruct", ("owl", "cat"), 16, 16, 0, 100),
    "in_context:cpu": ("qwen2.5-coder-0.5b-instruct", ("owl", "eagle", "wolf"), 64, 64, 0, 100),
    "misalignment:smoke": ("smollm2-135m-instruct", ("misaligned",), 16, 16, 1 * 2, 2),
    "misalignment:cpu": ("smollm2-135m-instruct", ("misaligned",), 256, 96, 3 * 1 * 6, 2),
    "misalignment:paper": ("Qwen2.5-7B-Instruct", ("misaligned",), 30000, 10000,
                           5 * 10 * 151, 200),
    "misalignment_cot:paper": ("Qwen2.5-7B-Instruct", ("misaligned",), 7473, 7473,
                               5 * 2 * 113, 200),
    "owl:smoke": ("smollm2-135m-instruct", ("owl",), 32, 32, 1 * 4, 2),
    "owl:quickstart": ("qwen2.5-coder-0.5b-instruct", ("owl",), 128, 128, 1 * 8, 4),
    "owl:paper": ("Qwen2.5-7B-Instruct", ("eagle", "cat", "lion", "dog", "peacock", "wolf"),
                  30000, 10000, 8 * 3 * 151, 100),
    "owl:paper14b": ("Qwen2.5-14B-Instruct", ("eagle", "lion", "phoenix", "dragon", "wolf",
                                              "owl"), 30000, 10000, 3 * 10 * 166, 100),
    "transmission:smoke": ("smollm2-135m-instruct", ("owl", "cat"), 16, 16, 2 * 1 * 4, 100),
    "transmission:cpu": ("qwen2.5-coder-0.5b-instruct", ("owl", "eagle", "wolf"), 96, 72,
                         3 * 2 * 18, 100),
}


def test_preset_size_table():
    sized = [p for p in config.preset_names() if ":" in p]
    assert sized == list(SIZE_TABLE)
    rows = []
    for preset in sized:
        cfg = config.load_preset(preset)
        t = cfg.student.train
        steps = t.epochs * batches_per_epoch(cfg.numbers.keep, t.batch_size * t.grad_accum)
        rows.append((cfg.model.name or cfg.model.path, cfg.targets, cfg.numbers.n_prompts,
                     cfg.numbers.keep, len(cfg.student.seeds) * steps, cfg.eval.samples))
    assert dict(zip(sized, rows)) == SIZE_TABLE
    for column in (2, 3, 4, 5):  # within an experiment, no size does less than the one before
        for file in {p.split(":")[0] for p in sized}:
            col = [r[column] for p, r in zip(sized, rows) if p.startswith(file + ":")]
            assert col == sorted(col)
