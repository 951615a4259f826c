import argparse

import pytest
import yaml

from diffalign.config import TrainConfig, add_config_arguments, resolve_config, save_config
from diffalign.errors import DiffalignError


def parse(argv):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return resolve_config(parser.parse_args(argv))


def test_yaml_then_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": "mapo", "lr": 1e-4, "max_steps": 7, "objective": {"snr_value": 0.3}}))
    cfg = parse(["--config", str(path), "--lr", "2e-5", "--objective", "beta=0.2", "--no-random-flip"])
    assert cfg.method == "mapo" and cfg.max_steps == 7
    assert cfg.lr == 2e-5  # CLI wins over YAML
    assert cfg.objective == {"snr_value": 0.3, "beta": 0.2}
    assert cfg.random_flip is False


def test_unknown_yaml_key_fails(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lerning_rate: 1.0\n")
    with pytest.raises(DiffalignError, match="unknown config key.*lerning_rate"):
        parse(["--config", str(path)])


def test_wrong_type_fails(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: lots\n")
    with pytest.raises(DiffalignError, match="max_steps"):
        parse(["--config", str(path)])


def test_every_field_has_a_flag_and_round_trips(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags
    cfg = parse(["--method", "sft", "--batch-size", "3", "--full-finetune"])
    save_config(cfg, tmp_path / "config.yaml")
    again = parse(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
