"""The embedded default: `diffalign train --method M` with no model or data runs on the toy world."""

import json

import pytest

from diffalign.cli import main
from diffalign.paths import asset

pytestmark = pytest.mark.skipif(not (asset("toy-sd") / "model_index.json").is_file(), reason="toy assets not built")


@pytest.mark.parametrize("method", ["dpo", "mapo"])
def test_short_quickstart_writes_every_output(method, tmp_path, capsys):
    out = tmp_path / method
    code = main(["train", "--method", method, "--max-steps", "2", "--output-dir", str(out),
                 "--eval-max-prompts", "2", "--eval-num-images", "1", "--num-inference-steps", "2"])
    assert code == 0
    for name in ("config.yaml", "metrics.jsonl", "training_curves.png", "pytorch_lora_weights.safetensors",
                 "eval/eval.json", "eval/grid.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "eval" / "eval.json").read_text())
    assert set(report["rewards"]) == {"toy-reward", "toy-judge"}
    assert report["num_prompts"] == 2
    for part in report["rewards"].values():
        assert 0.0 <= part["win_rate"] <= 1.0 and part["win_rate_ci"][0] <= part["win_rate"] <= part["win_rate_ci"][1]
    assert "toy quickstart" in capsys.readouterr().out


def test_flow_quickstart_uses_the_flow_model(tmp_path):
    out = tmp_path / "flow"
    assert main(["train", "--method", "flow-dpo", "--max-steps", "1", "--output-dir", str(out),
                 "--eval-max-prompts", "1", "--num-inference-steps", "1"]) == 0
    assert "toy-flow" in (out / "config.yaml").read_text()


def quickstart_config(argv):
    """The config `diffalign train ARGV` would train with (CLI over the quickstart base), without training."""
    from diffalign.cli import build_parser
    from diffalign.config import resolve_config
    from diffalign.train import quickstart_base

    full = ["train", *argv]
    args = build_parser(full)[0].parse_args(full)
    return resolve_config(args, base=quickstart_base(args))


@pytest.mark.parametrize("argv, lr", [
    (["--method", "dpo"], 1e-4),
    (["--method", "flow-dpo"], 1e-4),
    (["--method", "mapo"], 1e-3),  # MaPO keeps the higher rate (docs/benchmarks.md)
    (["--method", "mapo", "--lr", "3e-5"], 3e-5),  # a user's --lr still wins
])
def test_quickstart_learning_rate_per_method(argv, lr):
    assert quickstart_config(argv).lr == pytest.approx(lr)


@pytest.mark.parametrize("argv, beta", [
    (["--method", "dcpo"], 5000.0),  # DPO's beta on toy-sd (docs/benchmarks.md, "What did not work")
    (["--method", "dcpo", "--beta", "500"], 500.0),  # a user's --beta still wins
    (["--method", "dcpo", "--model", "toy-flow"], None),  # toy-flow keeps the flow default (100)
    (["--method", "dpo"], None),
])
def test_quickstart_beta_per_method(argv, beta):
    assert quickstart_config(argv).beta == beta


@pytest.mark.parametrize("argv, model, dataset, output_dir", [
    (["--method", "rankdpo", "--model", "toy-flow"], "toy-flow", "toy-data/toy-flow/ranked.parquet",
     "outputs/quickstart-rankdpo-toy-flow"),
    (["--method", "dcpo", "--model", "toy-flow"], "toy-flow", "toy-data/toy-flow/pairs.parquet",
     "outputs/quickstart-dcpo-toy-flow"),
    (["--method", "dpo", "--model", "toy-sd"], "toy-sd", "toy-data/toy-sd/pairs.parquet", "outputs/quickstart-dpo"),
    (["--method", "rankdpo"], "toy-sd", "toy-data/toy-sd/ranked.parquet", "outputs/quickstart-rankdpo"),
])
def test_a_toy_model_alone_runs_the_quickstart_on_its_own_data(argv, model, dataset, output_dir):
    cfg = quickstart_config(argv)
    assert (cfg.model, cfg.dataset, cfg.output_dir) == (model, dataset, output_dir)
