"""GAN family: RRDB generator + patch discriminator, adversarial losses, the site's state folder, the GAN task."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from client.evaluation import METRIC_KEYS
from client.state import StateError, load_state, save_state_atomic, site_state_dir
from client.tasks import RoundJob, task_for
from client.tasks.gan import GanTask, discriminator_state_path
from shared_models.checkpoint import load_checkpoint, save_checkpoint
from shared_models.gan import (
    DISCRIMINATOR_PREFIX,
    GANPair,
    GanOptions,
    RRDBGenerator,
    export_generator,
    federated_state,
)
from shared_models.losses import (
    nonsaturating_discriminator_loss,
    nonsaturating_generator_loss,
    relativistic_discriminator_loss,
    relativistic_generator_loss,
)
from shared_models.registry import build_model, model_spec
from shared_models.resample import upsample_baseline
from simulation.phantoms import write_phantom_sites
from tests.conftest import overfit_losses

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = {"num-examples", "train-loss", "train-seconds", "train-patches", "d-loss", "g-adv-loss"}


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights everywhere (the untrained generator's zero output conv would hide differences)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("family", ["gan", "rrdb"])
def test_generator_output_shape(family: str, scale: int) -> None:
    model = build_model(family, preset="tiny", scale=scale)
    out = model(torch.rand(2, 1, 12, 10))
    assert out.shape == (2, 1, 12 * scale, 10 * scale)


def test_discriminator_gives_patch_logits_and_has_no_batchnorm() -> None:
    for norm in ("group", "spectral", "none"):
        pair = build_model("gan", preset="tiny", d_norm=norm)
        logits = pair.discriminator(torch.rand(3, 1, 32, 32))
        assert logits.shape == (3, 1, 3, 3)  # 32 -> 16 -> 8 -> 4 -> 3 (stride-1 4x4) -> 3
        assert not [m for m in pair.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with pytest.raises(ValueError, match="larger patches"):
        pair.discriminator(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="norm"):
        build_model("gan", preset="tiny", d_norm="batch")


def test_3d_is_refused_with_a_clear_error() -> None:
    for family in ("gan", "rrdb"):
        with pytest.raises(ValueError, match="2D only"):
            build_model(family, preset="tiny", spatial_dims=3)


@pytest.mark.parametrize("scale", [2, 4])
def test_untrained_pair_returns_bicubic(scale: int) -> None:
    lr = torch.rand(2, 1, 10, 12)
    pair = build_model("gan", preset="tiny", scale=scale)
    with torch.no_grad():
        torch.testing.assert_close(pair(lr), upsample_baseline(lr, scale), rtol=0, atol=1e-7)


def test_pair_keys_and_federated_state() -> None:
    pair = build_model("gan", preset="tiny")
    keys = set(pair.state_dict())
    assert keys and all(k.startswith(("generator.", DISCRIMINATOR_PREFIX)) for k in keys)
    discriminator_keys = {k for k in keys if k.startswith(DISCRIMINATOR_PREFIX)}
    assert discriminator_keys
    assert set(federated_state(pair, "federated")) == keys
    local = federated_state(pair, "local")
    assert set(local) == keys - discriminator_keys
    assert not any(DISCRIMINATOR_PREFIX in k or "discriminator" in k for k in local)
    with pytest.raises(ValueError, match="federated, local"):
        federated_state(pair, "shared")


def test_exported_generator_checkpoint_round_trip(tmp_path: Path) -> None:
    pair = build_model("gan", preset="tiny", scale=4, width=16, growth=8)
    _randomise(pair)
    generator = export_generator(pair)
    assert isinstance(generator, RRDBGenerator) and model_spec(generator)["name"] == "rrdb"
    path = save_checkpoint(tmp_path / "final.pt", generator, scale=4)
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert stored and not any("discriminator" in k for k in stored)
    loaded, meta = load_checkpoint(path)
    assert meta["model"]["name"] == "rrdb" and meta["scale"] == 4
    lr = torch.rand(2, 1, 9, 11)
    pair.eval()
    with torch.no_grad():
        expected = pair(lr)
        assert (expected - upsample_baseline(lr, 4)).abs().max() > 1e-3  # really not the untrained output
        torch.testing.assert_close(loaded(lr), expected, rtol=0, atol=0)
        torch.testing.assert_close(generator(lr), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="'gan' or 'rrdb'"):
        export_generator(build_model("edsr", preset="tiny"))


def test_tiny_generator_overfits_one_real_patch_pair(mr_patch_pair) -> None:
    """Without the global skip the untrained output is far from the HR patch; 150 Adam steps (2-4 s on one CPU
    thread) must bring the L1 loss down at least 10x (observed 18-21x over seeds 0-2)."""
    torch.manual_seed(0)
    lr, hr = mr_patch_pair
    generator = build_model("rrdb", preset="tiny", width=16, growth=8, global_residual=False)
    steps = 150
    losses = overfit_losses(generator, lr, hr, steps, 2e-3)
    assert losses[0] / losses[-1] >= 10.0, (losses[0], losses[-1])


# ------------------------------------------------------------------------------------------------ losses


def test_adversarial_losses_reward_the_right_side() -> None:
    even = torch.zeros(4, 1, 3, 3)
    # Indistinguishable real and fake: every logit difference is 0, each BCE term is log 2.
    for loss in (relativistic_discriminator_loss, relativistic_generator_loss):
        assert loss(even, even).item() == pytest.approx(math.log(2))
    assert nonsaturating_discriminator_loss(even, even).item() == pytest.approx(2 * math.log(2))
    assert nonsaturating_generator_loss(even, even).item() == pytest.approx(math.log(2))
    real, fake = even + 3.0, even - 3.0  # the discriminator tells them apart
    assert relativistic_discriminator_loss(real, fake) < 0.01 < relativistic_generator_loss(real, fake)
    assert nonsaturating_discriminator_loss(real, fake) < 0.1 < nonsaturating_generator_loss(real, fake)
    # The generator's relativistic loss falls as its fakes look more real than the reals.
    fake = torch.zeros(4, 1, 3, 3, requires_grad=True)
    relativistic_generator_loss(real, fake).backward()
    assert (fake.grad < 0).all()


# ------------------------------------------------------------------------------------------------ state


def test_site_state_dir_default_and_configured(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    default = site_state_dir({}, site)
    assert default == site / ".fedsr-state" and default.is_dir()
    configured = site_state_dir({"state-dir": str(tmp_path / "state" / "a")}, site)
    assert configured == tmp_path / "state" / "a" and configured.is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match="state-dir="):
        site_state_dir({"state-dir": str(tmp_path / "file" / "sub")}, site)


def test_state_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "d.pt"
    assert load_state(path) is None
    first = {"w": torch.arange(6.0).reshape(2, 3), "nested": {"step": torch.tensor(3), "betas": (0.9, 0.99)}}
    save_state_atomic(path, first)
    second = {"w": torch.ones(2), "round": 4}
    save_state_atomic(path, second)
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.pt"]  # no temporary file left behind
    loaded = load_state(path)
    assert set(loaded) == {"w", "round"} and loaded["round"] == 4
    torch.testing.assert_close(loaded["w"], second["w"])
    with pytest.raises(TypeError, match="only tensors and plain values"):
        save_state_atomic(path, {"bad": object()})
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.pt"]
    torch.testing.assert_close(load_state(path)["w"], second["w"])  # the refused write left the file as it was
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(StateError, match="d.pt: state file cannot be read"):
        load_state(path)


# ------------------------------------------------------------------------------------------------ task


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = write_phantom_sites(tmp_path_factory.mktemp("sites"), n_sites=1, subjects_per_site=3, shape=(48, 48, 16))
    return site


def _job(server_round: int, mode: str = "federated", **changes) -> RoundJob:
    job = RoundJob(
        model="gan", scale=2, server_round=server_round, local_steps=4, batch_size=2, patch_size=32,
        learning_rate=1e-3, loss="l1", seed=0, eval_max_slices=4,
        options=GanOptions(discriminator=mode, warmup_rounds=1, adversarial_weight=0.005),
    )
    return dataclasses.replace(job, **changes)


def _fresh(job: RoundJob, seed: int = 0) -> GANPair:
    """A small GAN pair (smaller than the tiny preset: quick tests), its initial weights seeded."""
    torch.manual_seed(seed)
    return build_model("gan", preset="tiny", width=16, growth=8, n_blocks=1, d_width=8, scale=job.scale)


def _discriminator(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items() if k.startswith(DISCRIMINATOR_PREFIX)}


def test_gan_task_is_the_familys_plugin_task() -> None:
    assert isinstance(task_for("gan"), GanTask)


def test_warmup_round_trains_the_generator_only(site_dir: Path) -> None:
    task, job = GanTask(), _job(server_round=1)
    site = task.prepare(str(site_dir), job)
    model = _fresh(job)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    result = task.train(model, sent, site, job)
    assert set(result.metrics) == METRICS
    assert result.metrics["d-loss"] == 0.0 and result.metrics["g-adv-loss"] == 0.0
    assert result.metrics["num-examples"] == sum(p.hr.shape[2] for p in site.train)
    assert set(result.weights) == set(sent)
    for key, value in _discriminator(sent).items():
        torch.testing.assert_close(result.weights[key], value, rtol=0, atol=0)
    assert any(not torch.equal(result.weights[k], sent[k]) for k in sent if k.startswith("generator."))


def test_adversarial_round_trains_both_networks(site_dir: Path) -> None:
    task, job = GanTask(), _job(server_round=2)
    site = task.prepare(str(site_dir), job)
    model = _fresh(job)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    result = task.train(model, sent, site, job)
    assert set(result.metrics) == METRICS
    assert result.metrics["g-adv-loss"] > 0 and result.metrics["d-loss"] > 0
    assert all(math.isfinite(v) for v in result.metrics.values())
    changed = [k for k, v in _discriminator(sent).items() if not torch.equal(result.weights[k], v)]
    assert changed
    scores = task.evaluate(model, result.weights, site, job)
    assert set(METRIC_KEYS) <= set(scores) and scores["num-val-slices"] > 0


def test_local_discriminator_stays_on_site_and_comes_back(tmp_path: Path, site_dir: Path) -> None:
    task, job = GanTask(), _job(server_round=2, mode="local")
    site = task.prepare(str(site_dir), job)
    model = _fresh(job)
    generator_only = {k: v.clone() for k, v in federated_state(model, "local").items()}
    path = discriminator_state_path(site_state_dir({}, site.directory), model)
    path.unlink(missing_ok=True)  # module-scoped site: start without a saved discriminator
    result = task.train(model, generator_only, site, job)
    assert set(result.metrics) == METRICS and result.metrics["d-loss"] > 0
    assert set(result.weights) == set(generator_only)
    assert not any("discriminator" in k for k in result.weights)
    assert path.is_file() and path.parent == site_dir / ".fedsr-state"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    saved = load_state(path)
    assert saved["round"] == 2 and saved["optimiser"]["state"]  # the optimiser's moments are kept too
    round_two_file = path.read_bytes()

    # Next round: freshly built models (any initial discriminator) get the generator from the coordinator and the
    # discriminator from disk, so they train identically; without the file they would not.
    next_job = dataclasses.replace(job, server_round=3)
    outcomes = []
    for build_seed in (1, 7):
        path.write_bytes(round_two_file)
        again = _fresh(next_job, seed=build_seed)
        outcomes.append(task.train(again, result.weights, site, next_job))
        assert load_state(path)["round"] == 3
    assert outcomes[0].metrics["d-loss"] == outcomes[1].metrics["d-loss"]
    path.unlink()
    fresh = task.train(_fresh(next_job, seed=1), result.weights, site, next_job)  # no file: a fresh discriminator
    assert fresh.metrics["d-loss"] != outcomes[0].metrics["d-loss"]
    assert not any("discriminator" in k for k in fresh.weights)


def test_local_discriminator_goes_to_the_supernodes_state_dir(tmp_path: Path, site_dir: Path) -> None:
    state_dir = tmp_path / "var-lib-fedsr"
    job = _job(server_round=2, mode="local", node_config={"state-dir": str(state_dir)})
    task = GanTask()
    site = task.prepare(str(site_dir), job)
    model = _fresh(job)
    task.train(model, federated_state(model, "local"), site, job)
    assert discriminator_state_path(state_dir, model).is_file()


def test_local_mode_refuses_weights_that_do_not_match(site_dir: Path) -> None:
    task, job = GanTask(), _job(server_round=2, mode="local")
    site = task.prepare(str(site_dir), job)
    model = _fresh(job)
    with pytest.raises(ValueError, match="must send the generator only"):
        task.train(model, dict(model.state_dict()), site, job)  # the coordinator sent the discriminator
    partial = federated_state(model, "local")
    partial.pop(next(iter(partial)))
    with pytest.raises(ValueError, match="missing"):
        task.train(_fresh(job), partial, site, job)
    with pytest.raises(ValueError, match="'federated' mode both"):
        task.train(_fresh(job), federated_state(model, "local"), site, _job(server_round=2))


def test_a_new_run_starts_a_fresh_reproducible_local_discriminator(site_dir: Path) -> None:
    """A saved discriminator from a round >= the current one belongs to another run: it is replaced by a fresh
    one seeded like the round, so two runs with the same seed train identically whatever was on disk."""
    task, job = GanTask(), _job(server_round=2, mode="local")
    site = task.prepare(str(site_dir), job)
    discriminator_state_path(site_state_dir({}, site.directory), _fresh(job)).unlink(missing_ok=True)
    results = []
    for build_seed in (0, 5):  # the second run finds the first run's round-2 file on disk
        model = _fresh(job, seed=0)
        sent = {k: v.clone() for k, v in federated_state(model, "local").items()}
        model = _fresh(job, seed=build_seed)  # a differently initialised discriminator
        results.append(task.train(model, sent, site, job))
    for key, value in results[0].weights.items():
        torch.testing.assert_close(results[1].weights[key], value, rtol=0, atol=0)
    assert results[1].metrics["d-loss"] == results[0].metrics["d-loss"]
