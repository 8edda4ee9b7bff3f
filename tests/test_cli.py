"""The CLI: flags and YAML configs resolve to the same run; --help and --print_config work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import TINY_ID, TINY_PLANS, tiny_args

from resenc_lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


def _resolved(cli) -> dict:
    cfg = cli.parser.dump(cli.config, format="parser_mode", skip_none=False)
    cfg = yaml.safe_load(cfg)
    cfg.pop("config", None)
    return cfg


def test_yaml_and_flags_resolve_to_the_same_run(tiny_dataset, results_dir, tmp_path):
    flags = tiny_args(results_dir, "--model.initial_lr", "0.005")
    config = {
        "plans": TINY_PLANS, "dataset": str(TINY_ID), "configuration": "3d_fullres", "fold": "0",
        "seed_everything": 123,
        "trainer": {"max_epochs": 2, "enable_model_summary": False},
        "model": {"initial_lr": 0.005},
        "data": {"results_dir": str(results_dir), "num_iterations_per_epoch": 3, "num_val_iterations_per_epoch": 2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    a = build_cli(flags)
    b = build_cli(["--config", str(path)])
    assert _resolved(a) == _resolved(b)
    assert a.model.hparams.initial_lr == b.model.hparams.initial_lr == 0.005
    assert a.datamodule.spec.output_folder == b.datamodule.spec.output_folder
    # a flag after --config overrides it
    c = build_cli(["--config", str(path), "--trainer.max_epochs", "5"])
    assert c.trainer.max_epochs == 5


@pytest.mark.parametrize("name", ["resenc_m", "resenc_l", "resenc_xl", "demo", "ddp"])
def test_shipped_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_cli(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] in (3, 1000)
    assert printed["plans"].startswith("nnUNetResEncUNet")


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--help"])
    text = capsys.readouterr().out
    for option in ("--plans", "--dataset", "--configuration", "--fold", "--resume", "--save_every",
                   "--data.num_iterations_per_epoch", "--model.initial_lr", "--trainer.max_epochs",
                   "--print_config", "--config"):
        assert option in text, option


def _printed(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as e:
        build_cli([*args, "--print_config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("flag", ["resume", "validate_only", "val_best", "deterministic", "memcheck", "npz"])
def test_boolean_flags_work_bare_as_in_nnunet(flag, capsys):
    assert _printed([f"--{flag}"], capsys)[flag] is True  # nnU-Net's `--c` style
    assert _printed([f"--{flag}", "--fold", "3"], capsys)[flag] is True  # bare, followed by another option
    assert _printed([f"--{flag}", "--fold", "3"], capsys)["fold"] == "3"
    assert _printed([f"--{flag}", "true"], capsys)[flag] is True
    assert _printed([f"--{flag}", "false"], capsys)[flag] is False
    assert _printed([], capsys)[flag] is False
    assert _printed(["--final_validation", "false"], capsys)["final_validation"] is False
