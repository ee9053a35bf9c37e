"""Deterministic CPU training: the same seed gives bit-identical weights; another seed does not."""

import pytest
import torch

from client.tasks import task_for
from server.settings import RunSettings
from shared_models.registry import build_from_settings
from simulation.phantoms import write_phantom_sites


@pytest.mark.parametrize("model", ["edsr", "srcnn"])
def test_local_training_is_bit_identical_for_a_seed(tmp_path, model, round_job):
    (site_dir,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=3, shape=(32, 32, 16))
    settings = RunSettings(model=model, local_steps=4, batch_size=4, patch_size=32)

    def trained(seed: int) -> dict[str, torch.Tensor]:
        job = round_job(settings.replace(seed=seed), server_round=1)
        task = task_for(model)
        net = build_from_settings(settings)  # seeded by the run seed (settings.seed), not the job's
        return task.train(net, net.state_dict(), task.prepare(str(site_dir), job), job).weights

    first, again, other = trained(0), trained(0), trained(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
