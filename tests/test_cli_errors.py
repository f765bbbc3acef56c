"""Errors a user can fix end as one message with exit status 2 (no traceback), found before any
model loads; config-file values are checked against the flags' types; --help shows real defaults."""
import warnings

import pytest

from clear_fast.config import TrainConfig, UserError, build_parser, parse_config
from clear_fast.train import main


def config_file(tmp_path, text, suffix=".yaml"):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, suffix, want", [
    ("learning_rate: 1e-3\n", ".yaml", {"learning_rate": 1e-3}),  # PyYAML (YAML 1.1) reads 1e-3 as a string
    ("weight_decay: 1e-2\nnoise_rate: '0.2'\n", ".yaml", {"weight_decay": 0.01, "noise_rate": 0.2}),
    ("plots: 'no'\nprogress: False\nbf16: 'Yes'\n", ".yaml", {"plots": False, "progress": False, "bf16": True}),
    ('{"overwrite": "false", "resume": "TRUE"}', ".json", {"overwrite": False, "resume": True}),
    ('{"batch_size": "8", "num_epochs": 2, "lora_alpha": 2}', ".json",
     {"batch_size": 8, "num_epochs": 2, "lora_alpha": 2.0}),
    ("noise_seed: null\ntarget_modules: query\n", ".yaml", {"noise_seed": None, "target_modules": ["query"]}),
])
def test_config_file_values_are_coerced_to_the_flag_types(tmp_path, text, suffix, want):
    cfg = parse_config(["--config", config_file(tmp_path, text, suffix)])
    got = {k: getattr(cfg, k) for k in want}
    assert got == want and all(type(got[k]) is type(want[k]) for k in want)


@pytest.mark.parametrize("text, named", [
    ("batch_size: 8.7\n", "batch_size: 8.7 is not an integer"),
    ("batch_size: true\n", "batch_size: True is not an integer"),
    ("overwrite: maybe\n", "overwrite: 'maybe' is not true or false"),
    ("overwrite: 1\n", "overwrite: 1 is not true or false"),
    ("learning_rate: fast\n", "learning_rate: 'fast' is not a number"),
    ("learning_rate: .nan\n", "learning_rate: nan is not a finite number"),
    ("dataset: 3\n", "dataset: 3 is not a string"),
    ("target_modules: [query, 3]\n", "target_modules: ['query', 3] is not a list of names"),
])
def test_wrong_config_file_values_name_file_key_value_and_type(tmp_path, capsys, text, named):
    path = config_file(tmp_path, text)
    assert main(["--config", path, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert path in err and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_every_wrong_config_value_is_named_at_once(tmp_path):
    with pytest.raises(UserError, match=r"(?s)batch_size: 8.7 .*overwrite: 'maybe'"):
        parse_config(["--config", config_file(tmp_path, "batch_size: 8.7\noverwrite: maybe\n")])


@pytest.mark.parametrize("text, suffix, message", [
    ("lr: [1, 2\n", ".yaml", "is not valid YAML: expected ',' or ']'"),
    ('{"batch_size": 8,}', ".json", "is not valid JSON"),
    ("- a\n- b\n", ".yaml", "must hold a mapping"),
    ("batchsize: 8\n", ".yaml", "unknown setting(s) batchsize"),
])
def test_malformed_config_files_are_one_message(tmp_path, capsys, text, suffix, message):
    path = config_file(tmp_path, text, suffix)
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert message in err and path in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--device", "tpu"], "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not one of"),
    (["--noise-type", "gaussian"], "--noise-type 'gaussian' is not one of none, symmetric"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
])
def test_settings_are_checked_before_anything_loads(flags, message):
    """parse_config loads no data and no model: these are refused up front."""
    with pytest.raises(UserError, match="invalid configuration") as caught:
        parse_config(flags)
    assert message in str(caught.value)


def test_accepted_devices():
    for device in ("auto", "cpu", "cuda", "cuda:1"):
        assert parse_config(["--device", device]).device == device


def test_a_gpu_that_is_not_there_is_one_message(tmp_path, capsys):
    import torch

    assert main(["--device", "cuda:99", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:99" in err
    assert ("only" in err) if torch.cuda.is_available() else ("no CUDA GPU" in err)


def test_model_folder_without_config_json(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--output-dir", str(tmp_path / "o")]) == 2
    assert "is a folder without config.json" in capsys.readouterr().err


@pytest.mark.parametrize("below", ["", "sub"])
def test_output_dir_naming_a_file(tmp_path, capsys, below):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / below if below else tmp_path / "afile"
    assert main(["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_data_errors_are_one_message(tmp_path, capsys):
    (tmp_path / "t.jsonl").write_text('{"text": "a", "label": 1.5}\n{"text": "b", "label": 2}\n')
    assert main(["--train-file", str(tmp_path / "t.jsonl"), "--test-file", str(tmp_path / "t.jsonl"),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert "got the float 1.5" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    defaults = TrainConfig()
    assert f"training batch size (default: {defaults.batch_size})" in text
    assert "write PNG plots (default: on)" in text and "bf16 units) (default: off)" in text
    assert f"(default: {defaults.model})" in text
    # a flag whose default depends on others keeps its own explanation
    assert "(default per method: LoRA 1e-2, full 3e-4)" in text
    assert "(default: symmetric on a built-in dataset or with --noise-rate; none on your own files" in text


FILES = ["--train-file", "train.csv", "--test-file", "test.csv"]


@pytest.mark.parametrize("flags, want", [
    ([], ("symmetric", 0.4)),  # a built-in dataset: the benchmark setting of `make run`
    (["--dataset", "Banking77"], ("symmetric", 0.4)),
    (["--dataset", "ag_news"], ("none", 0.0)),  # a hub dataset: the user's labels as they are
    (FILES, ("none", 0.0)),
    (FILES + ["--noise-rate", "0.2"], ("symmetric", 0.2)),
    (FILES + ["--noise-type", "asymmetric"], ("asymmetric", 0.4)),
    (["--noise-type", "none"], ("none", 0.0)),
])
def test_noise_is_injected_by_default_only_into_built_in_datasets(flags, want):
    cfg = parse_config(flags)
    assert (cfg.noise_type, cfg.noise_rate) == want
    builtin = "--train-file" not in flags and "ag_news" not in flags
    assert cfg.max_train_samples == (2000 if builtin else 0), "a subset by default only of built-in data"
    assert parse_config(flags + ["--max-train-samples", "300"]).max_train_samples == 300


def test_routed_method_with_only_warm_up_epochs_warns():
    with pytest.warns(UserWarning, match="every epoch is warm-up"):
        parse_config(["--warmup-epochs", "3", "--num-epochs", "3"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config(["--warmup-epochs", "3", "--num-epochs", "3", "--method", "lora"])  # nothing routes anyway
        parse_config(["--warmup-epochs", "2", "--num-epochs", "3"])


def test_cli_prints_a_settings_warning_as_one_line(capsys, tmp_path):
    assert main(["--warmup-epochs", "3", "--num-epochs", "3", "--dataset", "no-such-dataset",
                 "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "warning: --method clear-lora with --warmup-epochs 3 >= --num-epochs 3" in err
    assert "UserWarning" not in err and "config.py" not in err


def test_version(capsys):
    import clear_fast
    from clear_fast.predict import build_parser as predict_parser

    for parser in (build_parser(), predict_parser()):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["--version"])
        assert stop.value.code == 0
        assert capsys.readouterr().out.strip() == f"clear_fast {clear_fast.__version__}"
