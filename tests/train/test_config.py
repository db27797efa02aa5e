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


# ----- the model: a file on the command line, and never a silent default --------------------------
def test_model_file_on_the_command_line_replaces_the_yaml_model():
    cfg = load_config(DEMO, ["model=configs/model/llada_8b.yaml", "train.seq_len=64"], check_paths=False)
    assert cfg.model.d_model == 4096 and cfg.model.vocab_size == 126464
    # model.KEY overrides apply on top of the file wherever they stand on the line
    for order in (["model=configs/model/tiny.yaml", "model.n_layers=2"], ["model.n_layers=2", "model=configs/model/tiny.yaml"]):
        cfg = load_config(DEMO, order, check_paths=False)
        assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.mask_token_id) == (128, 2, 2)
    # absolute paths, and paths relative to the config's folder, work too
    cfg = load_config(DEMO, [f"model={REPO / 'configs' / 'model' / 'tiny.yaml'}"], check_paths=False)
    assert cfg.model.d_model == 128
    cfg = load_config(DEMO, ["model=model/llada_8b.yaml"], check_paths=False)
    assert cfg.model.d_model == 4096


def test_model_file_replaces_rather_than_merges(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("d_model: 64\nn_heads: 4\nn_kv_heads: 4\nmlp_hidden_size: 128\nvocab_size: 4096\n"
                     "embedding_size: 4096\nmask_token_id: 2\neos_token_id: 1\npad_token_id: 1\nbos_token_id: 0\n")
    cfg = load_config(DEMO, [f"model={small}"], check_paths=False)
    # n_layers and max_sequence_length come from the schema, not from the demo's model file
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.max_sequence_length) == (64, 32, 4096)


def _passwd_like(folder):
    path = folder / "passwd"
    path.write_text("".join(f"user{i}:x:{i}:{i}:User {i}:/home/user{i}:/bin/bash\n" for i in range(200)))
    return path


@pytest.mark.parametrize(
    "value, message",
    [
        ("configs/model/missing.yaml", "model config file not found: configs/model/missing.yaml"),
        ("PASSWD", "passwd: not a model config"),
        ("README.md", "cannot parse YAML"),
        ("", "names no model file"),
        ("{d_model: 64,", "bad value for 'model'"),
    ],
)
def test_bad_model_file_on_the_command_line_is_one_line(value, message, tmp_path):
    if value == "PASSWD":  # any file that is not a model YAML, e.g. /etc/passwd
        value = str(_passwd_like(tmp_path))
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [f"model={value}"], check_paths=False)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert len(text) < 300  # names the problem, never echoes the file


def test_model_file_on_the_cli_trains_and_a_missing_one_is_one_line(tmp_path, embedded_shards):
    out = tmp_path / "run"
    proc = run_module([
        "-m", "train", str(DEMO), "model=configs/model/tiny.yaml", "model.n_layers=1", f"train.out_dir={out}",
        f"data.sources=[{{path: {embedded_shards}}}]", "train.max_steps=1", "train.seq_len=32",
        "train.global_batch_size=4", "train.micro_batch_size=4", "logging.wandb=disabled",
        "logging.progress_bar=false", "eval.every=0",
    ], timeout=300)
    assert (out / "checkpoints" / "latest").is_file(), proc.stderr
    assert "n_layers: 1" in (out / "checkpoints" / "step_00000001" / "config.yaml").read_text()
    proc = run_module(["-m", "train", str(DEMO), "model=configs/model/nope.yaml"], check=False, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["config error: model config file not found: configs/model/nope.yaml "
                                                f"(looked in {REPO} and {REPO / 'configs'})"]


@pytest.mark.parametrize(
    "text", ["", "train:\n  max_steps: 3\n", "model:\n", "# only a comment\n"],
    ids=["empty", "no-model-key", "model-null", "comment-only"],
)
def test_a_config_without_a_model_is_refused(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="no model named") as info:
        load_config(path, check_paths=False)
    assert "\n" not in str(info.value)
    # naming one on the command line is enough
    assert load_config(path, ["model=configs/model/tiny.yaml"], check_paths=False).model.d_model == 128


def test_model_key_pointing_at_any_file_is_one_short_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {_passwd_like(tmp_path)}\n")
    with pytest.raises(ConfigError, match="not a model config") as info:
        load_config(path, check_paths=False)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    proc = run_module(["-m", "train", str(path)], check=False, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
