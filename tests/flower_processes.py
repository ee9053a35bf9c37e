"""Real Flower deployment processes for tests: a SuperLink and SuperNodes on 127.0.0.1, ended by pid.

Everything is real (``flower-superlink``, ``flower-supernode``, the ``flwr`` CLI), on free ports, with the test's
own ``FLWR_HOME`` and credentials made by ``deploy.credentials``; nothing is mocked. The classes live in
``deploy.launch`` (``fedsr deploy local`` uses them too); this module re-exports them with test-sized settings. API::

    from flower_processes import LocalFederation, ROOT   # tests/ is on sys.path under pytest

    with LocalFederation(tmp_path, sites=["a", "b"]) as fed:      # credentials + SuperLink (TLS + node auth)
        fed.start_supernode("a", site_dir_a)                       # registers the key, starts, -> FlowerProcess
        fed.start_supernode("b", site_dir_b, state_dir=...)
        fed.wait_for_nodes(2, timeout=60)                          # -> the online nodes (flwr supernode list)
        run_id = fed.start_run({"num-rounds": 2, ...})             # flwr run ROOT fedsr --run-config ...
        run = fed.wait_for_run(run_id, timeout=300)                # -> flwr list's row once "finished:*"
        assert run["status"] == "finished:completed"
    # leaving the block stops every SuperNode, then the SuperLink, and every process they started (by pid)

- ``LocalFederation(root, sites, *, tls=True, name="fedsr", app_dir=ROOT)``: ``root/credentials`` (CA, ``superlink.*`` for
  127.0.0.1 and localhost, one key pair per site), ``root/flwr-home/config.toml`` with the SuperLink connection
  ``name``, the SuperLink's database ``root/superlink.db``, logs ``root/logs/NAME-N.log`` (``superlink-1.log``, ``supernode-a-1.log`` ...). ``tls=False`` starts the
  explicitly insecure SuperLink (plaintext, no node authentication). ``start()``/``stop()`` or ``with``.
- ``fed.address`` (``"127.0.0.1:PORT"``), ``fed.credentials`` (``CredentialPaths``), ``fed.env`` (environment for
  any ``flwr`` command: ``FLWR_HOME`` + no runtime dependency installation), ``fed.superlink`` and
  ``fed.supernodes[site]`` (``deploy.launch.FlowerProcess``: ``.pid``, ``.poll()``, ``.stop()``, ``.log_text()``,
  ``.wait_for_log(pattern, timeout)``).
- ``FlwrCli(flwr_home, name="fedsr", processes=(), app_dir=ROOT)``: the ``flwr`` helpers below for processes started another way
  (e.g. through ``fedsr deploy``); ``LocalFederation`` is one.
- ``fed.flwr(*args, timeout=120, check=True)`` -> ``subprocess.CompletedProcess`` of ``flwr ARGS`` (cwd: the repo).
  ``fed.flwr_json(*args)`` -> the JSON ``flwr ... --format json`` prints.
- ``fed.register(site)`` -> node id; ``fed.start_supernode(site, site_dir, *, state_dir=None, register=True,
  extra_args=(), device="cpu")`` -> FlowerProcess (a free runtime port each; starting a site again replaces ``fed.supernodes[site]``, its key is
  registered once); ``fed.kill_supernode(site)``: SIGKILL by pid, no goodbye to the SuperLink (a crash); ``fed.restart_superlink()``: stop and start it on the same
  address and database.
- ``fed.nodes()`` -> ``flwr supernode list`` rows; ``fed.wait_for_nodes(n, timeout)`` waits until ``n`` are online.
- ``fed.start_run(run_config)`` -> run id (``flwr run``; values are written as TOML);
  ``fed.wait_for_run(run_id, timeout)`` -> the run's ``flwr list`` row once its status starts with "finished"
  (raises with every log's tail after ``timeout``); ``fed.run_status(run_id)`` -> that row now.
- ``tiny_run_config(run_dir, **overrides)``: the smallest fedsr run that exercises everything (2 rounds, 4 local
  steps, batch 4, patch 32, 4 eval slices, no baselines) with an absolute ``run-dir``.
- ``phantom_sites(directory, n_sites)``: phantom site folders small enough for these tests (5 subjects, 48x48x16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.launch import FlowerProcess, FlowerProcessError, FlwrCli, LocalFederation, parse_json_output, toml_value

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["ROOT", "FlowerProcess", "FlowerProcessError", "FlwrCli", "LocalFederation", "parse_json_output",
           "phantom_sites", "tiny_run_config", "toml_value"]


def tiny_run_config(run_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Run-config overrides for a fedsr run of a few seconds per round on this machine's CPU."""
    config: dict[str, Any] = {"num-rounds": 2, "local-steps": 4, "batch-size": 4, "patch-size": 32,
                              "eval-max-slices": 4, "baselines": "none",
                              "run-dir": str(Path(run_dir).resolve())}
    return {**config, **overrides}


def phantom_sites(directory: Path, n_sites: int) -> list[Path]:
    """``n_sites`` phantom site folders under ``directory`` (5 subjects each, 48x48x16 voxels)."""
    from simulation.phantoms import write_phantom_sites

    return write_phantom_sites(directory, n_sites=n_sites, subjects_per_site=5, shape=(48, 48, 16))
