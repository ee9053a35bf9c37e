"""``fedsr deploy``: credentials, and a real SuperLink with SuperNodes (TLS + node authentication) on 127.0.0.1.

Real processes (``flower-superlink``, ``flower-supernode``, ``flwr``), free ports, the test's own ``FLWR_HOME``;
every process is ended by its pid, also when a test fails (``FlowerProcess`` / ``LocalFederation`` are context
managers). Keys are checked with Flower's own loaders, certificates with ``cryptography``'s X.509 verifier.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from typer.testing import CliRunner

from deploy.credentials import CredentialPaths, certificate_hosts
from deploy.launch import FlowerProcess, alive, descendants, free_port, node_config_arg, supernode_command
from flower_processes import FlwrCli, LocalFederation, phantom_sites, tiny_run_config
from shared_models.cli import app

FEDSR = [sys.executable, "-m", "shared_models.cli"]


def fedsr(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **(env or {})})
    return result.exit_code, result.output


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def verify_server(paths: CredentialPaths, name: x509.GeneralName) -> None:
    """Verify superlink.crt for ``name`` against ca.crt as a TLS client would (raises VerificationError)."""
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(paths.superlink_cert.read_bytes())
    PolicyBuilder().store(Store([ca])).build_server_verifier(name).verify(leaf, [])


# ------------------------------------------------------------------------------------------------ credentials
def test_credentials_cover_every_host_keep_keys_private_and_load_in_flower(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    folder = tmp_path / "creds"
    code, out = fedsr("deploy", "credentials", str(folder), "--host", "coordinator.example.org", "--host", "10.0.0.5",
                      "--site", "alpha", "--site", "beta")
    assert code == 0, out
    paths = CredentialPaths(folder)
    assert certificate_hosts(paths.superlink_cert) == ["coordinator.example.org", "10.0.0.5"]
    verify_server(paths, x509.DNSName("coordinator.example.org"))
    verify_server(paths, x509.IPAddress(ipaddress.ip_address("10.0.0.5")))
    with pytest.raises(VerificationError):
        verify_server(paths, x509.DNSName("elsewhere.example.org"))

    assert {mode(p) for p in (paths.ca_key, paths.superlink_key, paths.site_private_key("alpha"),
                              paths.site_private_key("beta"))} == {0o600}
    assert {mode(p) for p in (folder, folder / "sites", paths.site_dir("alpha"))} == {0o700}
    assert mode(paths.ca_cert) == 0o644 and paths.sites() == ["alpha", "beta"]
    for site in ("alpha", "beta"):  # the formats flower-supernode and flwr supernode register read
        private = serialization.load_ssh_private_key(paths.site_private_key(site).read_bytes(), None)
        assert public_key_to_bytes(private.public_key()) == try_load_public_key(paths.site_public_key(site))
    assert paths.site_public_key("alpha").read_bytes() != paths.site_public_key("beta").read_bytes()


def test_credentials_are_never_overwritten_unless_forced(tmp_path):
    folder = tmp_path / "creds"
    assert fedsr("deploy", "credentials", str(folder), "--host", "127.0.0.1", "--site", "a")[0] == 0
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    code, out = fedsr("deploy", "credentials", str(folder), "--host", "127.0.0.1", "--site", "a", "--site", "b")
    assert code == 2 and "ca.crt" in out and "--force" in out, out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before  # not even b was written

    code, out = fedsr("deploy", "credentials", str(folder), "--host", "127.0.0.1", "--site", "a", "--force")
    assert code == 0 and "replaced" in out and "supernode.key" in out, out
    assert (folder / "ca.crt").read_bytes() != before[folder / "ca.crt"]
    assert mode(CredentialPaths(folder).site_private_key("a")) == 0o600


@pytest.mark.parametrize("args, expected", [
    (["--host", "https://x.org"], "not a host name"),
    (["--host", "127.0.0.1", "--site", "../up"], "not a usable site name"),
])
def test_credentials_refuse_bad_hosts_and_site_names(tmp_path, args, expected):
    code, out = fedsr("deploy", "credentials", str(tmp_path / "c"), *args)
    assert code == 2 and expected in out, out
    assert not (tmp_path / "c" / "ca.key").exists()


def test_a_hospitals_deploy_commands_load_neither_the_simulator_nor_ray():
    script = "import sys, deploy.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "'deploy'" in loaded and "'simulation'" not in loaded and "'ray'" not in loaded, loaded


def test_node_config_values_reach_flower_as_written():
    from flwr.common.config import parse_config_args

    values = {"site-dir": "/data/site one/it's", "state-dir": "C:\\state", "device": "cpu"}
    assert parse_config_args([node_config_arg(values)]) == values


def test_the_warm_executor_keeps_the_libraries_and_drops_fedsr_s_own_modules():
    """Each forked ClientApp imports fedsr's code from the run's FAB, as flwr-clientapp would; torch, MONAI and
    Flower are already loaded."""
    script = ("import sys, deploy.warm_clientapps as warm; warm.warm_up(); "
              "print(sorted({m.split('.')[0] for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert all(f"'{library}'" in loaded for library in ("torch", "monai", "flwr", "pydicom", "nibabel")), loaded
    assert not [p for p in ("client", "shared_models", "server", "simulation") if f"'{p}'" in loaded], loaded


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


# ------------------------------------------------------------------------------------------------ real processes
def test_unregistered_key_and_plaintext_are_refused(tmp_path):
    (site,) = phantom_sites(tmp_path / "sites", 1)
    with LocalFederation(tmp_path / "fed", ["known", "stranger"]) as fed:
        fed.start_supernode("known", site)
        stranger = fed.start_supernode("stranger", site, register=False)
        assert stranger.wait(timeout=90) != 0
        assert "Failed to activate SuperNode" in stranger.log_text()
        fed.superlink.wait_for_log("No SuperNode found with the given public key", timeout=10)

        # `fedsr deploy supernode --insecure`'s command (plaintext; Flower itself refuses a key without TLS),
        # giving up after 8 s: the TLS SuperLink never answers it
        plaintext = supernode_command(fed.address, site, credentials=None, site=None, port=free_port(),
                                      max_wait_time=8)
        with FlowerProcess(plaintext, fed.logs / "plaintext.log", env=fed.env, name="plaintext") as node:
            assert node.wait(timeout=90) != 0
            assert "Connection attempt failed" in node.log_text()
        (online,) = fed.wait_for_nodes(1, timeout=60)
        assert [n["status"] for n in fed.nodes()] == ["online"]  # the stranger never became a node


@pytest.mark.slow
def test_two_sites_with_tls_and_authentication_run_the_app_to_a_report(tmp_path):
    """The README's commands: credentials, superlink, register, supernode, then `flwr run` and `flwr list`."""
    creds, flwr_home, run_dir = tmp_path / "creds", tmp_path / "flwr-home", tmp_path / "run"
    site_dirs = phantom_sites(tmp_path / "sites", 2)
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "COLUMNS": "200"}
    assert fedsr("deploy", "credentials", str(creds), "--host", "localhost", "--host", "127.0.0.1",
                 "--site", "a", "--site", "b")[0] == 0
    port = free_port()
    superlink = FlowerProcess([*FEDSR, "deploy", "superlink", "--credentials", str(creds), "--database",
                               str(tmp_path / "state" / "superlink.db"), "--address", f"127.0.0.1:{port}"],
                              tmp_path / "logs" / "superlink.log", env=env, name="superlink")
    started: list[int] = []
    with superlink:
        superlink.wait_for_log(r"Uvicorn running on https://127\.0\.0\.1", timeout=90)
        connection = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"]["fedsr"]
        assert connection == {"address": f"localhost:{port}", "root-certificates": str(creds.resolve() / "ca.crt")}
        for name in ("a", "b"):
            assert fedsr("deploy", "register", "--credentials", str(creds), "--site", name, env=env)[0] == 0
        nodes = [FlowerProcess([*FEDSR, "deploy", "supernode", "--credentials", str(creds), "--site", name,
                                "--superlink", f"localhost:{port}", "--site-dir", str(folder), "--state-dir",
                                str(tmp_path / "state" / name), "--device", "cpu", "--port", str(free_port())],
                               tmp_path / "logs" / f"supernode-{name}.log", env=env, name=f"supernode {name}")
                 for name, folder in zip("ab", site_dirs)]
        with nodes[0], nodes[1]:
            fed = FlwrCli(flwr_home, "fedsr", processes=[superlink, *nodes])
            fed.wait_for_nodes(2, timeout=90)
            # one round and no round 0: every message starts a ClientApp process (torch imported again each time)
            run_id = fed.start_run(tiny_run_config(run_dir, **{"num-sites": 2, "num-rounds": 1, "evaluate-round-zero": False}))
            row = fed.wait_for_run(run_id, timeout=900)
            assert row["status"] == "finished:completed", fed.log_tails()
            started = [p.pid for p in (superlink, *nodes)] + [d for p in (superlink, *nodes) for d in descendants(p.pid)]
            for node in nodes:  # each SuperNode's ClientApps came from its warm executor, not flwr-clientapp
                assert ["--serve" in command_line(pid) for pid in descendants(node.pid)] == [True], node.log_tail()
    assert (run_dir / "final_model.pt").is_file()
    report = (run_dir / "report.json").read_text()
    assert "site-1-siemens-3t" in report and "site-2-ge-1.5t" in report
    assert [pid for pid in started if alive(pid)] == []
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))



@pytest.mark.slow
def test_deploy_local_ends_every_process_and_frees_the_port_when_stopped(tmp_path):
    """`fedsr deploy local` brings up a SuperLink and a SuperNode per site; SIGTERM (as Ctrl-C) ends them all."""
    sites = tmp_path / "sites"
    phantom_sites(sites, 2)
    config = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                      for k, v in tiny_run_config(tmp_path / "run").items() if k != "run-dir")
    command = FlowerProcess([*FEDSR, "deploy", "local", "--sites-dir", str(sites), "--run-dir", str(tmp_path / "run"),
                             "--run-config", config], tmp_path / "local.log", env={"COLUMNS": "200"},
                            name="fedsr deploy local")
    with command:
        found = command.wait_for_log(r"flwr run \d+ on SuperLink 127\.0\.0\.1:(\d+)", timeout=300)
        started = [command.pid, *descendants(command.pid)]
        assert len(started) >= 1 + 3 * 2  # itself; SuperLink and 2 SuperNodes, each with its SuperExec
        os.kill(command.pid, signal.SIGTERM)
        assert command.wait(timeout=90) == 130, command.log_tail()
    assert "stopped." in command.log_text()
    assert [pid for pid in started if alive(pid)] == []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", int(found.group(1))))
