"""The ``fedsr`` root (shared_models/cli.py): a thin command whose sub-commands belong to the parts.

A hospital's commands and the ClientApp load neither the simulator nor Ray (ARCHITECTURE.md, issue 6 part 5), the
root's help lists every command without importing any part, and the simulator's options come from the declared run
settings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared_models.cli import COMMANDS, SITES_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
WIDE = dict(os.environ, COLUMNS="250", TERMINAL_WIDTH="250")  # no wrapping of help lines


def run_python(script: str, *args: str, env: dict | None = None) -> tuple[int, str, list[str]]:
    """Run ``script`` in a fresh interpreter; it ends by printing ``MODULES <json list>``. Returns (exit code of
    the command it ran, its other output, the sorted names of every module loaded)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env or WIDE, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    modules = json.loads(next(line for line in lines if line.startswith("MODULES "))[len("MODULES "):])
    code = int(next(line for line in lines if line.startswith("CODE "))[len("CODE "):])
    rest = "\n".join(line for line in lines if not line.startswith(("MODULES ", "CODE ")))
    return code, rest + proc.stderr, modules


RUN_ROOT = """
    import json, sys
    {before}
    from shared_models.cli import main
    try:
        main(sys.argv[1:])
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    print("CODE", code)
    print("MODULES", json.dumps(sorted(sys.modules)))
"""


def loaded(modules: list[str], *packages: str) -> list[str]:
    return [name for name in modules if name.split(".")[0] in packages]


def test_a_hospitals_commands_and_the_clientapp_load_neither_the_simulator_nor_ray(tmp_path):
    from simulation.phantoms import write_phantom_sites

    (site,) = write_phantom_sites(tmp_path, n_sites=1, subjects_per_site=3, shape=(32, 32, 16))
    code, out, modules = run_python(RUN_ROOT.format(before="import client.app, client.cli"), "sites", "check",
                                    str(site))
    assert code == 0, out
    assert "site-1-siemens-3t" in out and "sub-001" in out
    assert "client.app" in modules and "client.cli" in modules  # the test imported what it claims
    assert loaded(modules, "simulation", "ray") == [], loaded(modules, "simulation", "ray")


@pytest.mark.parametrize("argv, table", [(["--help"], COMMANDS), (["sites", "--help"], SITES_COMMANDS)])
def test_help_lists_every_command_without_importing_a_part(argv, table):
    code, out, modules = run_python(RUN_ROOT.format(before=""), *argv)
    assert code == 0, out
    for name, entry in table.items():
        assert name in out
        assert entry.short_help.replace("\\[", "[") in out, (name, out)
    if argv == ["--help"]:
        assert "models" in out and "sites" in out
    assert loaded(modules, "client", "server", "simulation", "torch", "flwr", "ray") == []


def test_every_lazy_command_loads_and_has_the_name_the_root_gives_it():
    from shared_models.cli import load_command

    for name, entry in {**COMMANDS, **SITES_COMMANDS}.items():
        command = load_command(entry.target, name)
        assert command.name == name, (entry.target, command.name)


def test_simulate_without_ray_says_how_to_install_the_simulator(tmp_path):
    hide_ray = "sys.modules['ray'] = None  # as if flwr[simulation] were not installed"
    run_dir = tmp_path / "run"
    code, out, _modules = run_python(RUN_ROOT.format(before=hide_ray), "simulate", "--run-dir", str(run_dir))
    assert code == 1, out
    assert "error:" in out and 'pip install "fedsr[simulation]"' in out
    assert not run_dir.exists()


def test_an_unknown_command_suggests_the_lazy_one():
    code, out, modules = run_python(RUN_ROOT.format(before=""), "simulat")
    assert code == 2 and "simulate" in out
    assert loaded(modules, "simulation") == []


def test_a_crash_never_prints_local_variables(tmp_path):
    """Locals can hold scan data and paths: a traceback through the root shows code, never their values."""
    crash = """
        import client.cli
        from shared_models.cli import main
        def crash(directory):
            where = "pat" + "ient-123.nii"  # a local whose value must not be printed
            raise RuntimeError("crash")
        client.cli.check_site_folder = crash
        main(["sites", "check", "."])
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(crash)], capture_output=True, text=True, cwd=ROOT,
                          env=WIDE, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "RuntimeError" in out and "crash" in out
    assert "patient-123.nii" not in out
