"""Run settings: pyproject's [tool.flwr.app.config] and RunSettings must agree, and bad values are refused."""

import tomllib
from pathlib import Path

import pytest

from server.settings import RunSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_run_config_matches_settings_defaults():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunSettings().to_run_config()
    assert RunSettings.from_run_config(declared) == RunSettings()


def test_flower_components_point_at_the_apps():
    components = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_run_config_overrides_and_types():
    settings = RunSettings.from_run_config({"num-rounds": 7, "learning-rate": 1, "scale": 4.0})
    assert (settings.num_rounds, settings.learning_rate, settings.scale) == (7, 1.0, 4)
    assert isinstance(settings.learning_rate, float) and isinstance(settings.scale, int)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"rounds": 3}, "unknown run-config keys ['rounds']"),
        ({"scale": 3}, "scale must be 2 or 4"),
        ({"num-rounds": "five"}, "'num-rounds' must be int"),
        ({"evaluate-round-zero": 1}, "must be true or false"),
        ({"patch-size": 30, "scale": 4}, "multiple of scale"),
        ({"device": "tpu"}, "device must be"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(config, words):
    with pytest.raises(ValueError, match=None) as error:
        RunSettings.from_run_config(config)
    assert words in str(error.value)


def test_required_sites_never_exceeds_the_federation():
    assert RunSettings(num_sites=1, min_sites=2).required_sites == 1
    assert RunSettings(num_sites=5, min_sites=3).required_sites == 3
