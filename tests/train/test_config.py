"""Bad configs fail at start with one clear line."""

import pytest

from tests.conftest import REPO, run_module
from train.config import ConfigError, load_config

DEMO = REPO / "configs" / "demo.yaml"


def test_demo_config_loads_with_model_include():
    cfg = load_config(DEMO, ["train.max_steps=7"], check_paths=False)
    assert cfg.train.max_steps == 7
    assert cfg.model.d_model == 128 and cfg.model.mask_token_id == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.nonsense=1"], "unknown config key 'train.nonsense'"),
        (["bogus.section=1"], "unknown config key 'bogus'"),
        (["train.max_steps=abc"], "bad value for 'train.max_steps'"),
        (["train.max_steps=0"], "bad value for 'train.max_steps': 0 (must be positive)"),
        (["train.precision=fp8"], "bad value for 'train.precision'"),
        (["train.seq_len=100000"], "exceeds model.max_sequence_length"),
        (["train.global_batch_size=15"], "must be a multiple of train.micro_batch_size"),
        (["model.n_heads=3"], "n_heads (3) must divide d_model"),
        (["train.drop_step=5"], "drop_step and train.drop_lr must be set together"),
        (["train.max_steps"], "is not of the form key=value"),
    ],
)
def test_bad_values_give_one_clear_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides, check_paths=False)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_bad_paths_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="data.sources\\[0\\].path does not exist"):
        load_config(DEMO, [f"data.sources=[{{path: {tmp_path}/missing}}]"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: model/does_not_exist.yaml\n")
    with pytest.raises(ConfigError, match="model config file not found"):
        load_config(bad)


def test_cli_prints_one_line_and_exits_nonzero():
    proc = run_module(["-m", "train", str(DEMO), "train.lr=-1"], check=False, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("config error: bad value for 'train.lr'"), proc.stderr
    assert len([line for line in lines if "error" in line.lower()]) == 1, proc.stderr
