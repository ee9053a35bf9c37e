"""The deployment files (``deploy/systemd``, ``deploy/docker``, ``deploy/README.md``) against what they run.

Every ``fedsr`` and ``flwr`` command line in the unit files, the compose file and the README is parsed by the real
command tree (click), so a renamed command or flag, or a run-config key that does not exist, fails here. The units
go through ``systemd-analyze verify`` and ``systemd-analyze security`` where systemd is installed (skipped with the
reason otherwise). The compose file and the Dockerfile are read as data: no Docker daemon is needed or started.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import typer
import yaml

from deploy.launch import DEFAULT_FEDERATION, DEFAULT_SUPERLINK_ADDRESS, DEFAULT_SUPERNODE_PORT, split_address
from shared_models.cli import app as fedsr_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNITS = {"superlink": SYSTEMD / "fedsr-superlink.service", "supernode": SYSTEMD / "fedsr-supernode@.service"}
ENV_EXAMPLES = {"superlink": SYSTEMD / "superlink.env.example", "supernode": SYSTEMD / "supernode.env.example"}
COMPOSE = DEPLOY / "docker" / "compose.yaml"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
README = DEPLOY / "README.md"
#: The instance name the template unit is checked with, and systemd's ``%S`` for a system service.
SITE = "hospital-a"
STATE_ROOT = "/var/lib"
#: The most ``systemd-analyze security`` may rate a unit ("OK" ends at 5.9; both units are well below).
MAX_EXPOSURE = 5.0


# ------------------------------------------------------------------------------------------------- the CLIs
def fedsr_root() -> click.Group:
    return typer.main.get_command(fedsr_app)  # type: ignore[return-value]


def flwr_root() -> click.Group:
    from flwr.cli.app import typer_click_object

    return typer_click_object


def parse(root: click.Group, args: list[str]) -> tuple[list[str], click.Context]:
    """Resolve ``args`` down ``root``'s command tree and parse the rest as the leaf command would, without running
    it. Returns (the command path, the leaf's context); raises click.UsageError for an unknown command or flag."""
    args = list(args)
    group_ctx = click.Context(root, info_name=root.name)
    command: click.Command = root
    path: list[str] = []
    while isinstance(command, click.Group):
        if not args:
            raise click.UsageError(f"{' '.join(path) or root.name}: no sub-command given")
        name = args.pop(0)
        found = command.get_command(group_ctx, name)
        if found is None:
            raise click.UsageError(f"no command {' '.join([*path, name])!r}")
        if isinstance(found, click.Group):
            group_ctx = click.Context(found, info_name=name, parent=group_ctx)
        command, path = found, [*path, name]
    return path, command.make_context(path[-1], args, parent=group_ctx)


# ---------------------------------------------------------------------------------------------- systemd units
def unit_entries(path: Path) -> list[tuple[str, str, str]]:
    """``(section, key, value)`` of every setting of a systemd unit file, in order (keys may repeat)."""
    entries, section, pending = [], "", ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        if line.endswith("\\"):  # a continued line
            pending = line[:-1] + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def unit_values(unit: str, key: str) -> list[str]:
    return [value for _, k, value in unit_entries(UNITS[unit]) if k == key]


def env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an environment file (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def specifiers(text: str) -> str:
    """systemd's ``%i`` (the instance: :data:`SITE`) and ``%S`` (the state root of a system service) filled in."""
    return re.sub(r"%[iS%]", lambda m: {"%i": SITE, "%S": STATE_ROOT, "%%": "%"}[m.group()], text)


def exec_start(unit: str) -> tuple[list[str], dict[str, str]]:
    """The unit's ExecStart as argv (specifiers and ``${VAR}`` filled in from its example settings and its
    ``Environment=``), and those settings."""
    env = env_file(ENV_EXAMPLES[unit])
    for assignments in unit_values(unit, "Environment"):
        env.update(item.split("=", 1) for item in shlex.split(specifiers(assignments)))
    (line,) = unit_values(unit, "ExecStart")
    assert not re.search(r"\$[A-Za-z_]", line), f"{UNITS[unit].name}: use ${{VAR}} (one word), never $VAR"
    missing = sorted(set(re.findall(r"\$\{(\w+)\}", line)) - set(env))
    assert not missing, f"{UNITS[unit].name} uses {missing}, which {ENV_EXAMPLES[unit].name} does not set"
    return shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], specifiers(line))), env


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_each_unit_runs_its_fedsr_deploy_command_with_tls_and_only_the_examples_settings(unit):
    argv, _ = exec_start(unit)
    assert Path(argv[0]).name == "fedsr"
    path, ctx = parse(fedsr_root(), argv[1:])
    assert path == ["deploy", unit]
    assert ctx.params["insecure"] is False
    # what deploy/README.md promises: no privileges, the file system read-only but for the state folder
    assert unit_values(unit, "User")[0] not in ("root", "0") and unit_values(unit, "NoNewPrivileges") == ["yes"]
    assert unit_values(unit, "ProtectSystem") == ["strict"] and not unit_values(unit, "ReadWritePaths")
    state = Path(specifiers(f"%S/{unit_values(unit, 'StateDirectory')[0]}"))  # the one folder the unit may write
    assert specifiers(unit_values(unit, "WorkingDirectory")[0]) == str(state)
    if unit == "superlink":
        assert Path(ctx.params["database"]).parent == state
    else:
        assert ctx.params["site"] == SITE, "the instance name is the site's key name"
        assert Path(ctx.params["state_dir"]).is_relative_to(state)
    line = unit_values(unit, "ExecStart")[0]
    unused = [key for key in env_file(ENV_EXAMPLES[unit]) if f"${{{key}}}" not in line]
    assert not unused, f"{ENV_EXAMPLES[unit].name} sets {unused}, which {UNITS[unit].name} never uses"


def test_the_examples_ports_are_the_commands_defaults():
    superlink, supernode = env_file(ENV_EXAMPLES["superlink"]), env_file(ENV_EXAMPLES["supernode"])
    assert superlink["FEDSR_ADDRESS"] == DEFAULT_SUPERLINK_ADDRESS
    assert int(supernode["FEDSR_RUNTIME_PORT"]) == DEFAULT_SUPERNODE_PORT
    assert split_address(supernode["FEDSR_SUPERLINK"])[1] == split_address(DEFAULT_SUPERLINK_ADDRESS)[1]


def installed_units(directory: Path) -> list[Path]:
    """The units copied into ``directory`` as systemd would load them (the template as instance :data:`SITE`),
    ``ExecStart`` pointing at this environment's ``fedsr`` (``systemd-analyze`` checks that the program exists)."""
    program = Path(sys.executable).parent / "fedsr"
    if not program.is_file():
        pytest.skip(f"no fedsr program beside {sys.executable} to point the units at (pip install -e .)")
    copies = []
    for source in UNITS.values():
        target = directory / source.name.replace("@.", f"@{SITE}.")
        target.write_text(source.read_text().replace("/opt/fedsr/venv/bin/fedsr", str(program)))
        copies.append(target)
    return copies


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60)


def test_units_pass_systemd_analyze_verify(tmp_path):
    units = installed_units(tmp_path)
    done = systemd_analyze("verify", "--man=no", *map(str, units))
    # verify exits 0 on unknown keys and bad values too, and only prints them: any message is a failure
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_units_keep_their_hardening(tmp_path):
    for unit in installed_units(tmp_path):
        done = systemd_analyze("security", "--offline=true", "--no-pager", str(unit))
        if "--offline" in done.stderr and done.returncode != 0:
            pytest.skip(f"this systemd-analyze has no offline security check: {done.stderr.strip()}")
        found = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout)
        assert found, done.stdout + done.stderr
        assert float(found.group(1)) <= MAX_EXPOSURE, f"{unit.name}: exposure {found.group(1)}\n{done.stdout}"


# ------------------------------------------------------------------------------------------------ compose file
def compose_documented_env() -> dict[str, str]:
    """The ``.env`` the compose file's header documents (``#     FEDSR_X=value``)."""
    return dict(re.findall(r"^#\s+(FEDSR_\w+)=(\S+)", COMPOSE.read_text(), flags=re.MULTILINE))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?message}`` (enough for this file; no Compose here)."""

    def one(match: re.Match[str]) -> str:
        name, operator, word = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if operator == ":?":
            raise KeyError(f"{name}: {word}")
        return word

    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def compose_service(name: str) -> tuple[dict, list[str], click.Context]:
    """The service (merge keys resolved by YAML), its command with the documented ``.env``, parsed by fedsr."""
    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    args = [interpolate(str(arg), compose_documented_env()) for arg in service["command"]]
    path, ctx = parse(fedsr_root(), args)
    return service, path, ctx


def mount(service: dict, target: str | Path) -> dict:
    """The long-syntax volume entry mounted at ``target``, or the one whose target holds it."""
    target = Path(target)
    for entry in service["volumes"]:
        if target == Path(entry["target"]) or target.is_relative_to(entry["target"]):
            return entry
    raise AssertionError(f"nothing is mounted at {target}: {service['volumes']}")


def test_compose_supernode_mounts_the_site_read_only_and_its_state_writable():
    env = compose_documented_env()
    service, path, ctx = compose_service("supernode")
    assert path == ["deploy", "supernode"] and ctx.params["insecure"] is False
    assert (ctx.params["site"], ctx.params["superlink_address"]) == (env["FEDSR_SITE"], env["FEDSR_SUPERLINK"])
    site = mount(service, ctx.params["site_dir"])
    assert site["type"] == "bind" and site["read_only"] is True
    assert interpolate(site["source"], env) == env["FEDSR_SITE_DIR"]
    credentials = mount(service, ctx.params["credentials_dir"])
    assert credentials["read_only"] is True and interpolate(credentials["source"], env) == env["FEDSR_CREDENTIALS"]
    state = mount(service, ctx.params["state_dir"])
    assert state["type"] == "volume" and not state.get("read_only", False)
    assert "ports" not in service and "profiles" not in service  # starts by default, serves nothing
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]


def test_compose_superlink_is_optional_and_publishes_the_port_it_serves():
    document = yaml.safe_load(COMPOSE.read_text())
    service, path, ctx = compose_service("superlink")
    assert path == ["deploy", "superlink"] and ctx.params["insecure"] is False
    assert service["profiles"] == ["coordinator"]
    port = split_address(ctx.params["address"])[1]
    assert service["ports"] == [f"{port}:{port}"]
    assert mount(service, ctx.params["credentials_dir"])["read_only"] is True
    assert mount(service, ctx.params["database"])["type"] == "volume"
    used = {entry["source"] for name in ("supernode", "superlink") for entry in document["services"][name]["volumes"]
            if entry["type"] == "volume"}
    assert used == set(document["volumes"])


def test_compose_builds_this_repositorys_dockerfile():
    build = yaml.safe_load(COMPOSE.read_text())["services"]["supernode"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE


# -------------------------------------------------------------------------------------------------- Dockerfile
def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order, continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        if raw.strip().startswith("#"):
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line:
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    return instructions


def test_dockerfile_installs_the_pinned_cpu_torch_before_the_project():
    steps = dockerfile_instructions(DOCKERFILE)
    runs = [args for word, args in steps if word == "RUN"]
    torch = next(i for i, args in enumerate(runs) if "torch==" in args)
    project = next(i for i, args in enumerate(runs) if re.search(r"pip install \.(\s|$)", args))
    assert torch < project
    readme_pin = re.search(r"pip install torch==(\S+)", (ROOT / "README.md").read_text()).group(1)
    assert f"torch=={readme_pin}" in runs[torch].split()
    assert '--index-url "${TORCH_INDEX_URL}"' in runs[torch]
    (default,) = [args.split("=", 1)[1] for word, args in steps if word == "ARG" and args.startswith("TORCH_INDEX")]
    assert default.endswith("/whl/cpu")


def test_dockerfile_copies_every_package_pyproject_installs_and_runs_as_a_non_root_user():
    steps = dockerfile_instructions(DOCKERFILE)
    copied = {Path(source).parts[0] for word, args in steps if word == "COPY" for source in args.split()[:-1]}
    assert all((ROOT / name).exists() for name in copied)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if any(fnmatch.fnmatch(p.parent.name, pattern)
                                                                         for pattern in patterns)}
    assert packages and packages | {"pyproject.toml", project["project"]["readme"]} <= copied
    ignored = {line.strip() for line in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()}
    assert not copied & ignored, "the build context leaves out a file the Dockerfile copies"
    users = [(i, args) for i, (word, args) in enumerate(steps) if word == "USER"]
    entry = next(i for i, (word, _) in enumerate(steps) if word == "ENTRYPOINT")
    assert users and users[-1][0] < entry
    assert users[-1][1].split(":")[0] not in ("root", "0")


# ------------------------------------------------------------------------------------------------------ README
def bash_lines(text: str) -> list[str]:
    """The command lines of every ```bash block (continuation lines joined)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        lines.extend(line for line in block.replace("\\\n", " ").splitlines() if line.strip())
    return lines


def invocations(line: str) -> list[tuple[str, list[str]]]:
    """``(program, args)`` of every fedsr or flwr command in a shell line: a ``.../bin/fedsr`` (or flwr) anywhere,
    a bare ``fedsr``/``flwr`` starting a simple command, and ``docker compose ... run SERVICE ARGS`` (the image's
    entry point is fedsr) or ``docker compose ... exec SERVICE fedsr|flwr ARGS``."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    found = []
    for tokens in [*commands, current]:
        if tokens[:2] == ["docker", "compose"] and {"run", "exec"} & set(tokens):
            verb = next(i for i, t in enumerate(tokens) if t in ("run", "exec"))
            rest = tokens[verb + 1:]
            while rest and rest[0].startswith("-"):
                rest = rest[1:]
            program, args = ("fedsr", rest[1:]) if tokens[verb] == "run" else (rest[1], rest[2:])
            found.append((program, args))
            continue
        for i, token in enumerate(tokens):
            if token.endswith(("bin/fedsr", "bin/flwr")) or (i == 0 and token in ("fedsr", "flwr")):
                found.append((Path(token).name, tokens[i + 1:]))
                break
    return found


def readme_commands() -> list[tuple[str, list[str], click.Context]]:
    roots = {"fedsr": fedsr_root(), "flwr": flwr_root()}
    parsed = []
    for line in bash_lines(README.read_text()):
        for program, args in invocations(line):
            try:
                path, ctx = parse(roots[program], args)
            except click.UsageError as error:
                raise AssertionError(f"deploy/README.md: {program} {' '.join(args)}\n{error}") from None
            parsed.append((program, path, ctx))
    return parsed


def test_every_readme_command_exists_with_its_flags_and_every_step_is_there():
    used = {(program, *path) for program, path, _ in readme_commands()}
    steps = {("fedsr", "deploy", "credentials"), ("fedsr", "deploy", "superlink"), ("fedsr", "deploy", "register"),
             ("fedsr", "deploy", "supernode"), ("fedsr", "deploy", "local"), ("fedsr", "sites", "check"),
             ("fedsr", "report"), ("flwr", "run"), ("flwr", "supernode", "list")}
    assert steps <= used, f"the README no longer shows {sorted(steps - used)}"


def test_readme_runs_use_the_connection_the_superlink_writes_and_real_run_config_keys():
    from flwr.common.config import flatten_dict, parse_config_args

    declared = set(flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]))
    commands = readme_commands()
    runs = [ctx for program, path, ctx in commands if (program, *path) == ("flwr", "run")]
    connections = {ctx.params["federation"] for program, path, ctx in commands
                   if (program, *path) == ("fedsr", "deploy", "superlink")}
    assert runs and connections == {DEFAULT_FEDERATION}
    for ctx in runs:
        assert ctx.params["superlink"] in connections
        keys = set(parse_config_args(list(ctx.params["run_config_overrides"])))
        assert keys <= declared, f"flwr run --run-config keys not in pyproject: {sorted(keys - declared)}"


def test_every_file_the_readme_names_exists():
    names = re.findall(r"`([^`\s]+)`", README.read_text())
    paths = [ROOT / n for n in names if n.startswith(("deploy/", "tests/"))]
    paths += [DEPLOY / n for n in names if n.startswith(("systemd/", "docker/")) or re.fullmatch(r"\w+\.py", n)]
    assert len(paths) >= 10
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    assert not missing, f"deploy/README.md names files that do not exist: {missing}"
