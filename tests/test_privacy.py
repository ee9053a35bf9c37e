"""Differential privacy at a site (client/privacy.py, client/privacy_ledger.py): the accountant against Opacus'
reference value and an independent recomputation, per-patient clipping on the real per-sample gradients, the
ledger's persistence and reset, the budget refusal, and ``fedsr privacy show|reset``."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.pairs import prepare_site
from client.paired import paired_for
from client.policy import SiteRefusal
from client.privacy import (PatientUnits, PrivateGradient, TileUnits, check_budget, clip_factors, plan_round,
                            private_fit, train_private, unit_rows)
from client.privacy_ledger import LEDGER_NAME, LedgerError, Mechanism, PrivacyLedger, epsilon_of
from client.state import DEFAULT_STATE_DIR_NAME
from conftest import make_thick_site
from server.settings import RunSettings
from shared_models.cli import app
from shared_models.losses import loss_from_spec
from shared_models.registry import build_from_settings
from simulation.phantoms import write_phantom_sites


# ----------------------------------------------------------------------------------------------- accountant
def test_the_accountant_gives_opacus_reference_epsilon():
    assert epsilon_of([Mechanism(1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.3291, abs=1e-4)


def rdp_subsampled_gaussian(q: float, sigma: float, alpha: int) -> float:
    """RDP of one Poisson-subsampled Gaussian step at integer order ``alpha`` (Mironov, Talwar, Zhang 2019,
    eq. 3: the binomial expansion), written here from the paper, not from Opacus."""
    logs = [math.log(math.comb(alpha, k)) + (alpha - k) * math.log(1 - q) + k * math.log(q)
            + (k * k - k) / (2 * sigma ** 2) for k in range(alpha + 1)]
    top = max(logs)  # summed in log space: the terms overflow a float at high orders
    return (top + math.log(sum(math.exp(term - top) for term in logs))) / (alpha - 1)


def epsilon_independently(mechanisms: list[Mechanism], delta: float, orders=range(2, 64)) -> float:
    """(epsilon, delta) from RDP at integer orders with Balle et al. 2020, Theorem 21's conversion."""
    best = math.inf
    for alpha in orders:
        rdp = sum(m.steps * rdp_subsampled_gaussian(m.sample_rate, m.noise_multiplier, alpha) for m in mechanisms)
        best = min(best, rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1))
    return best


def test_ledger_epsilon_equals_an_independent_recomputation_from_the_recorded_mechanisms(tmp_path):
    ledger = PrivacyLedger.open(tmp_path)
    for mechanism in [Mechanism(1.1, 0.25, 40), Mechanism(0.9, 0.5, 10), Mechanism(2.0, 0.1, 300)]:
        ledger.record(run="7", round_=1, purpose="", unit="patient", mechanism=mechanism, delta=1e-5)
    recorded = [Mechanism(**e["mechanism"]) for e in json.loads((tmp_path / LEDGER_NAME).read_text())["entries"]]
    ours = ledger.epsilon("patient", 1e-5)
    integer_orders = epsilon_independently(recorded, 1e-5)
    # Opacus searches fractional orders too, so it may only be tighter; on integer orders the two agree exactly
    assert ours <= integer_orders <= ours * 1.05
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [m.as_opacus() for m in recorded]
    assert accountant.get_epsilon(1e-5, alphas=list(range(2, 64))) == pytest.approx(integer_orders, rel=1e-9)


# ------------------------------------------------------------------------------------------- per-patient clipping
@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A phantom site (5 patients: 3 train, 1 val, 1 test) prepared as a 2D supervised task prepares it."""
    (folder,) = write_phantom_sites(tmp_path_factory.mktemp("dp"), n_sites=1, subjects_per_site=5,
                                    shape=(48, 48, 16))
    return prepare_site(str(folder), 2, paired_for(2))


def dp_job(round_job, **overrides):
    settings = RunSettings(patch_size=32, batch_size=8, local_steps=3, num_rounds=2, dp="local", **overrides)
    return round_job(settings, 1)


def test_each_patients_clipped_gradient_is_at_most_c_and_is_that_patients_own_gradient(site, round_job):
    job = dp_job(round_job, dp_patches_per_patient=3)
    units = PatientUnits(site, job, np.random.default_rng(0), job.dp_patches_per_patient)
    assert len(units) == len({pair.patient for pair in site.train}) >= 2
    model = build_from_settings(job)
    units_plan = plan_round(units, job, 1e-5)
    private = PrivateGradient(model, units_plan, torch.Generator())
    params = private.params
    chosen = np.arange(len(units))
    lr, hr = units.batch(chosen)  # the per-patient draws, in patient-major order (3 patches each)
    grads, _loss = private.unit_gradients(lambda module: loss_from_spec("l1")(module(lr), hr),
                                          unit_rows(len(chosen), 3), len(chosen))
    private.close()
    criterion = loss_from_spec("l1")
    for unit in chosen:  # each patient's gradient computed alone, with plain autograd
        rows = slice(unit * 3, unit * 3 + 3)
        model.zero_grad()
        criterion(model(lr[rows]), hr[rows]).backward()
        for param, per_unit in zip(params, grads):
            torch.testing.assert_close(per_unit[unit], param.grad, rtol=1e-4, atol=1e-6)
    clip = 0.5 * float(torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0).min())
    factors, clipped = clip_factors(grads, clip)
    scaled = torch.stack([torch.stack([(f * g).flatten().norm() for f, g in zip(factors, grad)]) for grad in grads])
    norms = scaled.norm(dim=0)  # each patient's clipped gradient over all parameters
    assert clipped == len(units) and bool((norms <= clip * (1 + 1e-5)).all()), norms
    # the step's gradient: the clipped patients' sum over the expected number of patients (noise set to 0 here)
    exact = dataclasses.replace(units_plan, noise_multiplier=0.0, clip_norm=clip)
    private = PrivateGradient(model, exact, torch.Generator())
    private.step_gradients(lambda module: loss_from_spec("l1")(module(lr), hr), unit_rows(len(chosen), 3),
                           len(chosen))
    private.close()
    for param, grad in zip(params, grads):
        expected = torch.tensordot(factors, grad, dims=1) / (exact.sample_rate * exact.units)
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-7)


def test_the_noise_is_planned_for_the_whole_training_not_per_round(site, round_job):
    job = dp_job(round_job, dp_target_epsilon=4.0)
    units = PatientUnits(site, job, np.random.default_rng(0), job.dp_patches_per_patient)
    plan = plan_round(units, job, 1e-5)
    assert plan.sample_rate == pytest.approx(min(1.0, job.batch_size / job.dp_patches_per_patient / len(units)))
    whole = epsilon_of([plan.mechanism] * job.num_rounds, 1e-5)
    assert 3.9 <= whole <= 4.0  # all rounds together spend the target (Opacus' search tolerance: 0.01)
    assert epsilon_of([plan.mechanism], 1e-5) < 3.0  # one round spends less: sigma was not planned per round


def test_a_round_whose_sampling_drew_no_patient_still_reports_a_finite_loss(site, round_job):
    """Poisson sampling can draw no unit in any step of a round (the update is then noise alone); the reply's
    train-loss must still be a number, or the coordinator rejects the site's reply as non-finite."""
    job = dp_job(round_job)
    units = PatientUnits(site, job, np.random.default_rng(0), job.dp_patches_per_patient)
    plan = dataclasses.replace(plan_round(units, job, 1e-5), sample_rate=1e-12)
    model = build_from_settings(job)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = train_private(model, units, plan, job)
    assert metrics["train-patches"] == 0 and metrics["dp-units-per-step"] == 0
    assert math.isfinite(metrics["train-loss"]) and metrics["train-loss"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the noise still moved it


def test_patch_units_are_the_tiles_of_the_training_slices(site):
    tiles = TileUnits(site.train, 2, 32, spatial_dims=2)
    lr, hr = tiles.batch([0, len(tiles) - 1])
    assert lr.shape == (2, 1, 16, 16) and hr.shape == (2, 1, 32, 32)
    per_slice = sum((pair.lr.shape[0] // 16) * (pair.lr.shape[1] // 16) * pair.lr.shape[2] for pair in site.train)
    assert 0 < len(tiles) <= per_slice  # background tiles left out


# ------------------------------------------------------------------------------------------ ledger and budget
def test_the_ledger_persists_accumulates_and_logs_a_reset(tmp_path):
    first = PrivacyLedger.open(tmp_path)
    first.record(run="1", round_=1, purpose="", unit="patient", mechanism=Mechanism(1.2, 0.5, 10), delta=1e-5)
    again = PrivacyLedger.open(tmp_path)  # a new process, a new run
    spend = again.record(run="2", round_=1, purpose="", unit="patient", mechanism=Mechanism(1.2, 0.5, 10),
                         delta=1e-5)
    assert spend.epsilon == pytest.approx(epsilon_of([Mechanism(1.2, 0.5, 20)], 1e-5))
    assert spend.epsilon > first.epsilon("patient", 1e-5)
    forgotten = again.reset("new data release", 1e-5)
    assert forgotten == {"patient": pytest.approx(spend.epsilon)}
    reread = PrivacyLedger.open(tmp_path)
    assert reread.epsilon("patient", 1e-5) == 0.0 and len(reread.spends()) == 2
    assert reread.entries[-1]["kind"] == "reset" and reread.entries[-1]["reason"] == "new data release"
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, nothing left behind


def test_an_unreadable_ledger_is_refused_not_replaced(tmp_path):
    (tmp_path / LEDGER_NAME).write_text("{ half a ledger")
    with pytest.raises(LedgerError) as caught:
        PrivacyLedger.open(tmp_path)
    assert caught.value.path == str(tmp_path / LEDGER_NAME) and "backup" in caught.value.hint


def test_a_round_past_the_budget_is_refused_before_training_and_spends_nothing(tmp_path, round_job):
    (folder,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=5, shape=(48, 48, 16))
    (folder / "site.toml").write_text((folder / "site.toml").read_text() + "\n[privacy]\nepsilon_budget = 4.5\n")
    site = prepare_site(str(folder), 2, paired_for(2))
    job = dp_job(round_job, dp_target_epsilon=5.0)  # the run plans 5 over 2 rounds: the second passes 4.5
    model = build_from_settings(job)
    metrics = private_fit(model, site, job, np.random.default_rng(0))
    assert 0 < metrics["dp-epsilon"] <= 4.5
    ledger_path = folder / DEFAULT_STATE_DIR_NAME / LEDGER_NAME
    before = ledger_path.read_bytes()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SiteRefusal) as caught:
        private_fit(model, site, job.replace(server_round=2), np.random.default_rng(1))
    assert caught.value.category == "privacy-budget" and "budget of 4.5" in caught.value.reason
    assert str(folder) not in caught.value.reason
    assert ledger_path.read_bytes() == before  # nothing recorded
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # nothing trained
    units = PatientUnits(site, job, np.random.default_rng(0), job.dp_patches_per_patient)
    with pytest.raises(SiteRefusal):
        check_budget(PrivacyLedger.open(ledger_path.parent), plan_round(units, job, 1e-5), site)


# ------------------------------------------------------------------------------------------------------ the CLI
def test_privacy_show_and_reset_commands(tmp_path):
    state = tmp_path / "site" / DEFAULT_STATE_DIR_NAME
    (tmp_path / "site").mkdir()
    PrivacyLedger.open(state).record(run="9", round_=3, purpose="", unit="patient",
                                     mechanism=Mechanism(1.0, 0.5, 10), delta=1e-5)
    runner = CliRunner()
    shown = runner.invoke(app, ["privacy", "show", str(tmp_path / "site")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    spent = f"{epsilon_of([Mechanism(1.0, 0.5, 10)], 1e-5):.4f}"
    assert spent in shown.output and "patient" in shown.output and "budget epsilon none" in shown.output
    refused = runner.invoke(app, ["privacy", "reset", str(tmp_path / "site"), "--reason", "new cohort"])
    assert refused.exit_code == 2 and "--yes" in refused.output
    done = runner.invoke(app, ["privacy", "reset", str(tmp_path / "site"), "--reason", "new cohort", "--yes"])
    assert done.exit_code == 0 and spent in done.output
    after = runner.invoke(app, ["privacy", "show", str(tmp_path / "site")], env={"COLUMNS": "200"})
    assert "reset" in after.output and "new cohort" in after.output and "nothing spent" not in after.output
    assert PrivacyLedger.open(state).epsilon("patient", 1e-5) == 0.0


# ------------------------------------------------------------------------------------------- every family under DP
@pytest.mark.parametrize("name, overrides", [("gan", {"gan.warmup-rounds": 0}), ("smore", {}), ("swinir", {})])
def test_every_family_trains_under_dp_and_spends_one_mechanism_per_round(tmp_path, round_job, name, overrides):
    """The GAN's generator and discriminator both train under DP (one joint mechanism per step), the
    self-supervised family on its own thick scans, the transformer with its attention tables."""
    from client.tasks import task_for

    (folder,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=5, shape=(48, 48, 32))
    if name == "smore":
        make_thick_site(folder, scale=2)
    settings = RunSettings.from_run_config({**RunSettings(model=name, patch_size=32, batch_size=8, local_steps=3,
                                                          num_rounds=2, dp="local").to_config(), **overrides})
    job = round_job(settings, 1)
    task = task_for(name)
    site = task.prepare(str(folder), job)
    model = build_from_settings(job)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = task.train(model, {k: v.clone() for k, v in before.items()}, site, job).metrics
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    if name == "gan":
        assert changed == {"generator", "discriminator"} and metrics["d-loss"] > 0
    else:
        assert changed
    (spend,) = PrivacyLedger.open(folder / DEFAULT_STATE_DIR_NAME).spends()
    assert spend.mechanism.steps == 3 and metrics["dp-epsilon"] == pytest.approx(spend.epsilon)
    assert metrics["dp-epsilon"] == pytest.approx(epsilon_of([spend.mechanism], 1e-5))


def test_every_registered_family_has_only_layers_opacus_computes_per_sample_gradients_for():
    """No BatchNorm (it mixes the samples of a batch) or other layer Opacus cannot handle, in any family."""
    from opacus.validators import ModuleValidator

    from shared_models.registry import families

    for name in families():
        model = build_from_settings(RunSettings(model=name))
        assert ModuleValidator.validate(model, strict=False) == [], name
        assert not [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)], name


def test_the_membership_attack_measures_what_a_threshold_on_the_error_tells_apart():
    from client.membership import loss_threshold_attack

    rng = np.random.default_rng(0)
    members, others = rng.normal(0.02, 0.01, 300), rng.normal(0.03, 0.01, 200)
    attack = loss_threshold_attack(members, others)
    pairs = (members[:, None] < others[None, :]).mean() + 0.5 * (members[:, None] == others[None, :]).mean()
    assert attack["mia-auc"] == pytest.approx(pairs)  # AUC = P(a member's error < a non-member's), pair by pair
    best = max((members <= t).mean() - (others <= t).mean() for t in np.linspace(0, 0.06, 6001))
    assert attack["mia-advantage"] == pytest.approx(best, abs=0.01)
    same = loss_threshold_attack(members, members.copy())
    assert same["mia-auc"] == pytest.approx(0.5) and same["mia-advantage"] == pytest.approx(0.0)
    assert (attack["mia-members"], attack["mia-non-members"]) == (300, 200)
