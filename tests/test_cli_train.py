"""The ``ds-conadv train`` main job, run in-process on the embedded digits default."""
import json

import pytest

from ds_conadv import cli


@pytest.mark.parametrize("optimizer,backend", [("lamb", "auto"), ("lars", "foreach")])
def test_train_digits_reaches_accuracy(tmp_path, optimizer, backend):
    out = tmp_path / "metrics.json"
    rc = cli.main(["train", "--optimizer", optimizer, "--backend", backend, "--epochs", "20",
                   "--no-progress", "--metrics-json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    m = data["metrics"]
    assert data["config"]["optimizer"] == optimizer
    assert m["optimizer"] == optimizer and m["backend"] == backend
    assert m["batch_size"] == 1024 and m["steps"] == 40
    assert m["train_accuracy"] > 0.95, m
    assert m["test_accuracy"] > 0.9, m


@pytest.mark.parametrize("name", ["digits_lamb.json", "digits_lars.json"])
def test_shipped_configs_are_valid(name):
    import os

    path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", name)
    cfg = cli.resolve_train_config(cli.load_config(path))
    assert cfg["optimizer"] in name
    assert set(cfg) == set(cli.DEFAULT_TRAIN_CONFIG)


def test_config_file_then_flags_override(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"optimizer": "lars", "epochs": 3, "lr": 2.0}))
    cfg = cli.resolve_train_config(cli.load_config(str(path)), {"epochs": 5, "lr": None})
    assert cfg["optimizer"] == "lars" and cfg["epochs"] == 5 and cfg["lr"] == 2.0
    assert cfg["weight_decay"] == cli.OPTIMIZER_DEFAULTS["lars"]["weight_decay"]


def test_unknown_config_key_is_rejected_by_name(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"epochs": 2, "learning_rate": 0.1}))
    with pytest.raises(cli.ConfigError, match="learning_rate"):
        cli.load_config(str(path))
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(path), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown key 'learning_rate'" in err
    assert "allowed keys:" in err and "batch_size" in err and "epochs" in err


def test_bad_config_value_is_rejected(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"optimizer": "adam"}))
    with pytest.raises(cli.ConfigError, match="optimizer"):
        cli.load_config(str(path))
