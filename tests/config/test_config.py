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


def test_every_data_option_is_reachable_from_train():
    """Each DataConfig field is a TrainConfig field (so a flag and a YAML key), and reaches the data."""
    import dataclasses

    from diffalign.data import DataConfig
    from diffalign.train import data_config

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {f.name for f in dataclasses.fields(DataConfig)} <= train_fields
    cfg = parse(["--dataset", "d.parquet", "--split", "validation", "--no-drop-ties", "--group-size", "3",
                 "--caption-column", "text", "--image-columns", "a", "b", "c", "--label-columns", "x", "y", "z",
                 "--shuffle-buffer", "7"])
    data = data_config(cfg)
    assert (data.split, data.drop_ties, data.group_size, data.caption_column) == ("validation", False, 3, "text")
    assert (data.image_columns, data.label_columns, data.shuffle_buffer) == (["a", "b", "c"], ["x", "y", "z"], 7)


def test_extends_reads_the_base_and_overrides_it(tmp_path):
    from diffalign.config import load_yaml

    (tmp_path / "base.yaml").write_text("lr: 1.0e-4\nmax_steps: 10\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "m.yaml").write_text("extends: ../base.yaml\nlr: 1.0e-3\n")
    assert load_yaml(tmp_path / "sub" / "m.yaml") == {"lr": 1e-3, "max_steps": 10}


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size 0 is too small"),
    (["--grad-accum", "0"], "--grad-accum 0 is too small"),
    (["--lr", "-1"], "--lr -1.0 must be a positive learning rate"),
    (["--mixed-precision", "fp8"], "mixed_precision 'fp8' is not valid: choose one of no, fp16, bf16"),
    (["--resolution", "17"], "--resolution 17 is not a positive multiple of 8"),
    (["--beta", "-1"], "dpo option beta=-1.0 must be a positive number"),
    (["--objective", "loss_type=cpo"], "dpo option loss_type='cpo' is not valid: choose one of sigmoid, hinge, ipo"),
    (["--objective", "betta=3"], "method 'dpo' has no option betta"),
    (["--method", "rankdpo", "--objective", "weighting=dgc"], "rankdpo option weighting='dgc' is not valid"),
    (["--method", "mapo", "--objective", "snr_value=0"], "mapo option snr_value=0 must be a positive number"),
    (["--group-size", "4"], "dpo trains on pairs, not groups of 4"),
    (["--caption-dropout", "1.5"], "--caption-dropout 1.5 must be in [0, 1)"),
    (["--method", "ppo"], "unknown method 'ppo'"),
    (["--eval-prompts", "toy", "--eval-rewards", "pickscor"], "pickscor"),
    (["--eval-prompts", "no-such-prompts.txt", "--eval-rewards", "clip"], "no-such-prompts.txt"),
])
def test_bad_values_fail_in_one_line_before_any_model_loads(argv, message, tmp_path):
    """train() validates first: the model named here does not exist, so reaching the loader would fail otherwise."""
    from diffalign.train import train

    cfg = parse(["--model", str(tmp_path / "no-such-model"), "--dataset", str(tmp_path / "none.parquet"),
                 "--output-dir", str(tmp_path / "out"), *argv])
    with pytest.raises(DiffalignError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as info:
        train(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written either
