"""Run settings are declared once: pyproject's table, the run config, the round config and the site's typed view
are derived from the declarations and must agree; bad values are refused where they are declared."""

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.common.config import flatten_dict, parse_config_args

from client.tasks.base import RoundJob
from server.run_log import read_run_config, write_run_config
from server.settings import RunSettings
from shared_models.gan import GanOptions
from shared_models.settings import SiteSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_run_config() -> dict:
    """``[tool.flwr.app.config]`` flattened exactly as Flower flattens it (nested tables -> ``table.key``)."""
    return flatten_dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def test_pyproject_run_config_is_the_declared_defaults():
    declared = pyproject_run_config()
    assert declared == RunSettings().to_config()
    assert RunSettings.from_run_config(declared) == RunSettings()
    assert "gan.discriminator" in declared  # a family's options, under its name


def test_flower_components_point_at_the_apps():
    components = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "server.app:app", "clientapp": "client.app:app"}


def test_what_travels_to_the_sites_is_the_site_settings_and_the_chosen_familys_options():
    edsr = RunSettings().round_config()
    assert set(edsr) == {d.key for d in SiteSettings.declared()}
    gan = RunSettings(model="gan").round_config()
    assert set(gan) == {d.key for d in SiteSettings.declared()} | {d.key for d in GanOptions.declared()}
    coordinator_only = {d.key for d in RunSettings.declared()} - {d.key for d in SiteSettings.declared()}
    assert coordinator_only and not coordinator_only & set(gan)  # e.g. run-dir, num-rounds never leave


# One non-default, valid value per site setting (a value the declaration accepts), set through a run-config text.
SITE_OVERRIDES = (
    'model="srcnn" model-preset="small" spatial-dims=3 scale=4 local-steps=7 batch-size=3 patch-size=64 '
    'learning-rate=0.0005 loss="l1:1,ssim:0.2" device="cpu" seed=11 eval-max-slices=5 num-rounds=9 '
    'dp="local" dp-unit="patch" dp-clip-norm=0.5 dp-noise-multiplier=1.1 '
    'dp-target-epsilon=3.0 '
    'dp-patches-per-patient=4 transfer-dtype="float16" personal="head" condition="acquisition" '
    'gan.discriminator="local" gan.warmup-rounds=3 gan.adversarial-weight=0.01'
)


def test_every_run_config_key_reaches_the_site_typed():
    run_config = parse_config_args([SITE_OVERRIDES])  # Flower's own parser, as `flwr run --run-config`
    settings = RunSettings.from_run_config(run_config)
    job = RoundJob.from_config({**settings.round_config(), "server-round": 4}, torch.device("cpu"))
    for declared in SiteSettings.declared():
        if declared.key == "dp-clipping":  # acts with dp = "central" only, while dp-unit needs "local": below
            continue
        assert getattr(job, declared.name) == run_config[declared.key], declared.key
        assert getattr(job, declared.name) != declared.default, f"{declared.key}: pick a non-default value"
    central = RunSettings.from_run_config({"dp": "central", "dp-clipping": "client-adaptive"})
    assert RoundJob.from_config(central.round_config(), torch.device("cpu")).dp_clipping == "client-adaptive"
    assert job.server_round == 4 and job.options is None  # srcnn declares no options; the GAN's stay home
    gan = settings.replace(model="gan", spatial_dims=2)
    job = RoundJob.from_config(gan.round_config(), torch.device("cpu"))
    assert job.options == GanOptions(discriminator="local", warmup_rounds=3, adversarial_weight=0.01)


def test_config_toml_round_trips_with_family_tables(tmp_path):
    settings = RunSettings.from_run_config(parse_config_args([SITE_OVERRIDES]))
    path = write_run_config(tmp_path, settings.to_config())
    assert "[gan]" in path.read_text()  # nested like pyproject, not a quoted dotted key
    assert RunSettings.from_run_config(read_run_config(tmp_path)) == settings


def test_run_config_overrides_and_types():
    settings = RunSettings.from_run_config({"num-rounds": 7, "learning-rate": 1, "scale": 4.0})
    assert (settings.num_rounds, settings.learning_rate, settings.scale) == (7, 1.0, 4)
    assert isinstance(settings.learning_rate, float) and isinstance(settings.scale, int)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"rounds": 3}, "unknown run-config keys ['rounds']"),
        ({"gan.discriminatr": "local"}, "unknown run-config keys ['gan.discriminatr']"),
        ({"scale": 3}, "scale must be one of 2, 4"),
        ({"num-rounds": "five"}, "'num-rounds' must be int"),
        ({"evaluate-round-zero": 1}, "must be true or false"),
        ({"patch-size": 30, "scale": 4}, "multiple of scale"),
        ({"device": "tpu"}, "device must be"),
        ({"gan.discriminator": "shared"}, "gan.discriminator must be one of federated, local"),
        ({"gan.adversarial-weight": -1.0}, "gan.adversarial-weight must be >= 0"),
        ({"model": "unet"}, "unknown model 'unet'"),
        ({"model": "gan", "spatial-dims": 3}, "supports spatial-dims 2, not 3"),
        ({"model-preset": "huge"}, "no preset 'huge'"),
        ({"baselines": "local,central"}, "baselines must be 'none' or a comma-separated list of local, pooled"),
        ({"baselines": "local,local"}, "baselines must be"),
        ({"holdout-site": "a", "leave-one-out": True}, "holdout-site and leave-one-out exclude each other"),
    ],
)
def test_bad_settings_are_refused_with_the_key_named(config, words):
    with pytest.raises(ValueError) as error:
        RunSettings.from_run_config(config)
    assert words in str(error.value)


@pytest.mark.parametrize("text, kinds", [("local", ("local",)), ("local,pooled", ("local", "pooled")),
                                         (" pooled , local ", ("pooled", "local")), ("none", ())])
def test_baselines_name_the_reference_models(text, kinds):
    assert RunSettings.from_run_config({"baselines": text}).baseline_kinds == kinds


def test_the_pooled_baseline_is_refused_outside_a_simulation():
    from server.baselines import pooled_problem

    assert "only a simulation" in pooled_problem(RunSettings(baselines="local,pooled"))
    assert pooled_problem(RunSettings(baselines="local,pooled", sites_dir="/sites")) is None
    assert pooled_problem(RunSettings(baselines="local")) is None


def test_a_site_refuses_a_bad_round_config_naming_the_key():
    config = {**RunSettings(model="gan").round_config(), "gan.warmup-rounds": "two"}
    with pytest.raises(ValueError, match="'gan.warmup-rounds' must be int"):
        RoundJob.from_config(config, torch.device("cpu"))


def test_required_sites_never_exceeds_the_federation():
    assert RunSettings(num_sites=1, min_sites=2).required_sites == 1
    assert RunSettings(num_sites=5, min_sites=3).required_sites == 3


def test_every_setting_says_what_it_does():
    for kind in (RunSettings, GanOptions):
        for declared in kind.declared():
            assert declared.help.strip(), declared.key
    assert all(f.name in {d.name for d in RunSettings.declared()} or f.name == "options"
               for f in dataclasses.fields(RunSettings))


@pytest.mark.parametrize("config, words", [
    ({"dp-unit": "patch"}, "dp-unit acts only with dp = 'local', not 'none'"),
    ({"dp": "central", "dp-patches-per-patient": 4}, "dp-patches-per-patient acts only with dp = 'local'"),
    ({"dp": "local", "dp-clipping": "client-fixed"}, "dp-clipping acts only with dp = 'central'"),
    ({"dp-target-epsilon": 2.0}, "dp-target-epsilon acts only with dp = 'local' or 'central'"),
])
def test_a_dp_setting_of_a_mode_that_is_off_is_refused(config, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        RunSettings.from_run_config(config)
