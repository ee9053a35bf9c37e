"""FedProx at the sites: the proximal term (mu/2)*||w - w_global||^2 over the weights that travel changes every
family's local gradient by exactly mu*(w - w_global), and costs nothing when mu is 0.

The check runs the real training loops on real models. Two steps from the received weights w0: the first step's
term is zero (w = w0), so both runs reach the same w1; the second step's gradient with mu minus the one without is
mu*(w1 - w0), w1 taken from a one-step run."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.privacy import PatientUnits, PrivacyPlan, train_private
from client.tasks import RoundJob, task_for
from client.tasks.gan import GanTask
from client.tasks.supervised import SupervisedTask
from server.settings import RunSettings
from shared_models.gan import DISCRIMINATOR_PREFIX, GanOptions
from shared_models.registry import build_from_settings, build_model
from simulation.phantoms import write_phantom_sites

pytestmark = pytest.mark.usefixtures("one_thread")

MU = 0.5


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (site,) = write_phantom_sites(tmp_path_factory.mktemp("prox"), n_sites=1, subjects_per_site=4, shape=(32, 32, 16))
    return site


def _randomised(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every parameter moved by noise (a zero-initialised output layer would leave the
    layers before it without gradient: the check would be vacuous there)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return {k: v.clone() for k, v in model.state_dict().items()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _after(make: Callable[[], nn.Module], train: Callable[[nn.Module, RoundJob], None], job: RoundJob,
           steps: int, mu: float) -> nn.Module:
    """A fresh model from the same received weights, trained ``steps`` steps with ``mu`` (same seeds every time)."""
    model = make()
    torch.manual_seed(0)
    train(model, dataclasses.replace(job, local_steps=steps, proximal_mu=mu))
    return model


def _check_proximal_gradient(make: Callable[[], nn.Module], train: Callable[[nn.Module, RoundJob], None],
                             job: RoundJob, travelling: set[str]) -> None:
    """Second-step gradients with and without mu differ by mu*(w1 - w0) on the travelling parameters, and not at
    all on the others; the term changes the update."""
    received = _state(make())
    w1 = _state(_after(make, train, job, 1, 0.0))
    plain, proximal = _after(make, train, job, 2, 0.0), _after(make, train, job, 2, MU)
    g_plain, g_prox = _grads(plain), _grads(proximal)
    assert set(g_prox) == set(g_plain) and travelling <= set(g_prox)
    for name in g_prox:
        expected = MU * (w1[name] - received[name]) if name in travelling else torch.zeros_like(w1[name])
        torch.testing.assert_close(g_prox[name] - g_plain[name], expected, rtol=0, atol=1e-6, msg=name)
    moved = [name for name in travelling if (w1[name] - received[name]).abs().max() > 1e-4]
    # the first step moved the weights, so the check is not vacuous (all but a parameter without gradient, as the
    # discriminator's last bias under the relativistic loss, blind to a shift of every logit)
    assert len(moved) >= 0.9 * len(travelling)
    assert any(not torch.equal(a, b) for a, b in zip(proximal.parameters(), plain.parameters()))


def test_round_job_reads_proximal_mu_from_the_train_config_and_mu_zero_makes_no_term() -> None:
    config = RunSettings(model="srcnn").round_config()
    assert RoundJob.from_config(config, torch.device("cpu")).proximal_mu == 0.0  # absent: plain local training
    job = RoundJob.from_config({**config, "proximal-mu": 0.25}, torch.device("cpu"))
    assert job.proximal_mu == 0.25
    model = build_from_settings(job)
    term = job.proximal(model)
    assert term is not None and {id(p) for p, _ in term.received} == {id(p) for p in model.parameters()}
    assert job.replace(proximal_mu=0.0).proximal(model) is None
    with pytest.raises(ValueError, match="proximal-mu"):
        RoundJob.from_config({**config, "proximal-mu": -1.0}, torch.device("cpu"))


@pytest.mark.parametrize("model_name", ["srcnn", "smore"])
def test_supervised_and_self_supervised_loss_gets_the_proximal_gradient(site_dir: Path, model_name: str) -> None:
    job = RoundJob.from_config(
        RunSettings(model=model_name, batch_size=2, patch_size=16, learning_rate=1e-2).round_config(),
        torch.device("cpu"))
    task = task_for(model_name)
    assert isinstance(task, SupervisedTask)
    site = task.prepare(str(site_dir), job)
    torch.manual_seed(1)
    received = _randomised(build_from_settings(job))

    def make() -> nn.Module:
        model = build_from_settings(job)
        task.load_global(model, received, site, job)
        return model

    def train(model: nn.Module, round_job: RoundJob) -> None:
        task.fit(model, site, round_job, np.random.default_rng(3))

    _check_proximal_gradient(make, train, job, {name for name, _ in make().named_parameters()})


@pytest.mark.parametrize("mode", ["federated", "local"])
def test_gan_generator_and_federated_discriminator_get_the_proximal_gradient(site_dir: Path, mode: str) -> None:
    """An adversarial round: the generator's gradient always has the term; the discriminator's only when it
    travels (federated), a local discriminator none (it starts from the same seeded weights in every run: the
    state it saves is of this round, so the next run starts it afresh)."""
    job = RoundJob(model="gan", scale=2, server_round=2, batch_size=2, patch_size=16, learning_rate=1e-2,
                   loss="l1", options=GanOptions(discriminator=mode, warmup_rounds=1, adversarial_weight=0.05))
    task = GanTask()
    site = task.prepare(str(site_dir), job)
    torch.manual_seed(1)
    pair = build_model("gan", preset="tiny", width=8, growth=4, n_blocks=1, d_width=8, scale=2)
    received = _randomised(pair)
    sent = {k: v for k, v in received.items() if mode == "federated" or not k.startswith(DISCRIMINATOR_PREFIX)}

    def make() -> nn.Module:
        model = build_model("gan", preset="tiny", width=8, growth=4, n_blocks=1, d_width=8, scale=2)
        model.load_state_dict(received)
        task.load_global(model, sent, site, job)
        return model

    def train(model: nn.Module, round_job: RoundJob) -> None:
        task.fit(model, site, round_job, np.random.default_rng(3))

    travelling = {name for name, _ in make().named_parameters() if name in sent}
    assert any(name.startswith("generator.") for name in travelling)
    assert any(name.startswith(DISCRIMINATOR_PREFIX) for name in travelling) == (mode == "federated")
    _check_proximal_gradient(make, train, job, travelling)


def test_dp_sgd_adds_the_proximal_gradient_after_clipping_and_noise(site_dir: Path) -> None:
    """DP-SGD with every patient in every step and no noise is deterministic: the term's gradient is added to the
    private one, unclipped."""
    job = RoundJob.from_config(
        RunSettings(model="srcnn", batch_size=2, patch_size=16, learning_rate=1e-2, dp="local").round_config(),
        torch.device("cpu"))
    task = SupervisedTask()
    site = task.prepare(str(site_dir), job)
    torch.manual_seed(1)
    received = _randomised(build_from_settings(job))
    patients = len({pair.patient for pair in site.train})

    def make() -> nn.Module:
        model = build_from_settings(job)
        model.load_state_dict(received)
        return model

    def train(model: nn.Module, round_job: RoundJob) -> None:
        units = PatientUnits(site, round_job, np.random.default_rng(3), 2)
        plan = PrivacyPlan("patient", patients, 2, sample_rate=1.0, noise_multiplier=0.0, clip_norm=0.1,
                           steps=round_job.local_steps, delta=1e-5)
        train_private(model, units, plan, round_job)

    _check_proximal_gradient(make, train, job, {name for name, _ in make().named_parameters()})
