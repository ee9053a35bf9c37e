"""A model family is one plugin: a throw-away family, written by this test as one module plus its registration (an
entry point of an installed distribution), is found by the coordinator and by every site and trains through one
federated round on Flower's simulation engine. Generic code names no family."""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
from flwr.simulation import run_simulation

from client.app import build_client_app
from server.app import build_server_app
from server.settings import RunSettings
from shared_models import registry
from shared_models.checkpoint import load_checkpoint
from shared_models.registry import families
from simulation.phantoms import write_phantom_sites

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A throw-away SR family: a bicubic skip plus one learned 3x3 correction."""
from dataclasses import dataclass

import torch
from torch import nn

from shared_models.registry import register_model
from shared_models.resample import upsample_baseline
from shared_models.settings import FamilyOptions, setting


@dataclass(frozen=True)
class TinyOptions(FamilyOptions):
    namespace = "throwaway."
    gain: float = setting(1.0, "Scale of the learned correction.", positive=True)


@register_model("throwaway", options=TinyOptions)
class Throwaway(nn.Module):
    def __init__(self, scale: int = 2, width: int = 4) -> None:
        super().__init__()
        self.scale = scale
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = upsample_baseline(x, self.scale)
        return up + self.body(up)
'''


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The family as an installed package would bring it: a module and an entry point in a .dist-info folder,
    on the path of this process and of the simulation's worker processes."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "fedsr_throwaway.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "fedsr_throwaway-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedsr-throwaway\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nthrowaway = fedsr_throwaway\n")
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), previous]))
    sys.path.insert(0, str(root))
    registry.load_installed_families()
    yield root
    registry.MODELS.pop("throwaway", None)  # other tests see the built-in families only
    sys.modules.pop("fedsr_throwaway", None)
    sys.path.remove(str(root))
    if previous is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = previous


def test_a_new_family_trains_through_one_federated_round(plugin, tmp_path):
    assert "throwaway" in families()
    settings = RunSettings.from_run_config(
        {"model": "throwaway", "throwaway.gain": 0.5, "num-rounds": 1, "num-sites": 2, "min-sites": 2,
         "local-steps": 3, "batch-size": 2, "patch-size": 32, "eval-max-slices": 4,
         "run-dir": str(tmp_path / "run"), "sites-dir": str(tmp_path / "sites")}
    )
    assert settings.round_config()["throwaway.gain"] == 0.5  # its options travel with the round
    sites = write_phantom_sites(tmp_path / "sites", n_sites=2, subjects_per_site=3, shape=(40, 40, 16))
    run_simulation(
        server_app=build_server_app(settings),
        client_app=build_client_app([str(p) for p in sites]),
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["phase"] == "train" and r["round"] == 1 and r["experiment"] == "global"]
    assert sorted(r["site"] for r in trained) == sorted(p.name for p in sites)
    assert all(r["train-patches"] == 3 * 2 for r in trained)
    model, meta = load_checkpoint(tmp_path / "run" / "final_model.pt")
    assert meta["model"]["name"] == "throwaway" and meta["model"]["params"]["scale"] == 2


#: Modules that serve every family and so must never name one.
GENERIC = [
    "server", "client/app.py", "client/cli.py", "client/evaluation.py", "client/pairs.py", "client/paired.py",
    "client/sites_report.py", "client/training.py", "client/tasks/__init__.py", "client/tasks/base.py", "client/tasks/supervised.py",
    "shared_models/inference.py", "shared_models/checkpoint.py", "shared_models/catalog.py",
    "shared_models/settings.py", "shared_models/cli.py", "simulation", "client/inference",
]


def test_generic_modules_never_name_a_family():
    builtin = {name for name, family in families().items() if family.factory.__module__.startswith("shared_models.")}
    assert {"edsr", "gan", "smore"} <= builtin
    pattern = re.compile(r"\b(" + "|".join(sorted(builtin)) + r")\b", re.IGNORECASE)
    offenders = {}
    for entry in GENERIC:
        paths = sorted((ROOT / entry).rglob("*.py")) if (ROOT / entry).is_dir() else [ROOT / entry]
        for path in filter(Path.exists, paths):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.setdefault(str(path.relative_to(ROOT)), []).append(f"{number}: {line.strip()}")
    assert offenders == {}
