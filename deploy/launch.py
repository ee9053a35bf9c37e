"""Start Flower's own deployment processes (``flower-superlink``, ``flower-supernode``) and stop them by pid.

Flower 1.42's SuperLink serves its Fleet API (SuperNodes), Control API (``flwr run``, ``flwr supernode register``)
and the ServerApp's runtime API on ONE HTTP(S) address, ``--host``/``--port`` (default 127.0.0.1:8000); the older
``--fleet-api-address``/``--control-api-address`` flags are deprecated there and only log a warning. A SuperNode
connects to that address (``--superlink HOST:PORT``) and serves its own ClientApp runtime API on
``--host``/``--port`` (default 127.0.0.1:9094: several SuperNodes on one machine need distinct ports).

The functions here return argv lists (``superlink_command``, ``supernode_command``) so that ``fedsr deploy``, the
systemd units' documentation and the tests start exactly the same command. :class:`FlowerProcess` runs one in its
own process group with its output in a log file and ends it, and every process it started, by pid.
:func:`write_federation` adds the SuperLink connection ``flwr`` reads (``$FLWR_HOME/config.toml``: ``[superlink.NAME]``
with ``address`` and ``root-certificates``, as ``flwr.cli.flower_config`` parses it). :class:`FlwrCli` drives
``flwr`` (register, list nodes, run, run status); :class:`LocalFederation` is a whole federation on 127.0.0.1
(``fedsr deploy local`` and the tests).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

from deploy.credentials import CredentialPaths, write_credentials
from shared_models.atomic import atomic_write

#: The SuperLink's one address (Fleet + Control + runtime API), as Flower 1.42 defaults its port.
DEFAULT_SUPERLINK_ADDRESS = "0.0.0.0:8000"
#: A SuperNode's local ClientApp runtime API port (Flower's default).
DEFAULT_SUPERNODE_PORT = 9094
#: Name of the SuperLink connection ``fedsr deploy superlink`` writes to Flower's config (``flwr run . fedsr``).
DEFAULT_FEDERATION = "fedsr"
#: Tells every Flower process to use the installed environment, never ``uv sync`` an app's dependencies per run.
NO_RUNTIME_INSTALL_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


class FlowerProcessError(RuntimeError):
    """A Flower process that ended or did not get ready in time; the message ends with the tail of its log."""


def flower_executable(name: str) -> str:
    """The path of Flower's console script ``name`` in this Python's environment (also when it is not activated)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name}: not found beside {sys.executable} nor on PATH. Install fedsr's "
                                "dependencies into this environment: pip install -e .")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS picks it; another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[v6]:PORT"`` for IPv6) -> ``(host, port)``; raises ValueError naming the address."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 0.0.0.0:8000 or coordinator.example.org:8000)")
    return host.strip("[]"), int(port)


def superlink_command(credentials: CredentialPaths | None, database: Path,
                      address: str = DEFAULT_SUPERLINK_ADDRESS) -> list[str]:
    """argv of ``flower-superlink`` serving on ``address``.

    With ``credentials``: TLS with the CA and the SuperLink's certificate, and CLI-managed node authentication
    (``--enable-supernode-auth``: only SuperNodes whose public key was registered may connect). ``None`` is the
    explicitly insecure mode: plaintext, no authentication (Flower refuses authentication without TLS).
    ``database``: the SQLite file that keeps runs and registered nodes across restarts. Runtime dependency
    installation is always off: the ServerApp runs in the installed environment.
    """
    host, port = split_address(address)
    argv = [flower_executable("flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(database), "--disable-runtime-dependency-installation"]
    if credentials is None:
        return [*argv, "--insecure"]
    return [*argv, "--ssl-ca-certfile", str(credentials.ca_cert), "--ssl-certfile", str(credentials.superlink_cert),
            "--ssl-keyfile", str(credentials.superlink_key), "--enable-supernode-auth"]


def supernode_command(superlink: str, site_dir: Path, *, credentials: CredentialPaths | None, site: str | None,
                      state_dir: Path | None = None, device: str = "auto", port: int = DEFAULT_SUPERNODE_PORT,
                      max_wait_time: float | None = None, warm: bool = True) -> list[str]:
    """argv of ``flower-supernode`` for one hospital, connecting to the SuperLink at ``superlink`` (HOST:PORT).

    ``warm`` (default): run it through :mod:`deploy.warm_clientapps`, whose executor forks each message's ClientApp
    from a process that has imported torch and MONAI once; ``False``: Flower's own, a fresh ``flwr-clientapp``
    process per message.

    With ``credentials`` (and ``site``): verifies the SuperLink with ``ca.crt`` and authenticates with the site's
    ``supernode.key``. ``None`` is the explicitly insecure mode (plaintext, no key). The node config carries
    what only the site knows: ``site-dir`` (its scans), ``state-dir`` (what outlives a run: privacy ledger, local
    layers; default: inside the site folder) and ``device``. ``port``: the local ClientApp runtime API on
    127.0.0.1. ``max_wait_time`` (seconds): give up when the SuperLink stays unreachable that long (default:
    retry forever).
    """
    split_address(superlink)
    node_config = {"site-dir": str(site_dir), "device": device}
    if state_dir is not None:
        node_config["state-dir"] = str(state_dir)
    argv = [flower_executable("flower-supernode"), "--superlink", superlink, "--port", str(port),
            "--node-config", node_config_arg(node_config)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", str(max_wait_time)]
    if credentials is None:
        argv.append("--insecure")
    elif site is None:
        raise ValueError("a SuperNode with credentials needs its site name (whose supernode.key it uses)")
    else:
        argv += ["--root-certificates", str(credentials.ca_cert),
                 "--auth-supernode-private-key", str(credentials.site_private_key(site))]
    if not warm:
        return argv
    from deploy.warm_clientapps import supernode_argv

    return supernode_argv(argv)


def node_config_arg(values: Mapping[str, str]) -> str:
    """``--node-config`` text: space-separated ``key=value`` pairs whose values are TOML strings.

    Flower splits the text on ``key=value`` pairs (``flwr.common.config.parse_config_args``) with values quoted
    in single or double quotes and no quote of the same kind inside, so a value holding both kinds is refused.
    """
    pairs = []
    for key, value in values.items():
        if "'" not in value:
            pairs.append(f"{key}='{value}'")  # a TOML literal string: backslashes kept as they are
        elif '"' not in value and "\\" not in value:
            pairs.append(f'{key}="{value}"')
        else:
            raise ValueError(f"{key}: {value!r} holds both quote kinds (or a quote and a backslash), which "
                             "--node-config cannot carry; rename the folder")
    return " ".join(pairs)


def flwr_home() -> Path:
    """Flower's configuration folder, as ``flwr`` finds it: ``$FLWR_HOME``, else ``~/.flwr``."""
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home()


def write_federation(name: str, address: str, root_certificates: Path | None, home: Path | None = None) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in Flower's config, ``HOME/config.toml``, and return it.

    ``flwr run . NAME``, ``flwr list NAME`` and ``flwr supernode register KEY NAME`` then reach the SuperLink's
    Control API at ``address`` (HOST:PORT, a host the certificate names), verifying it with
    ``root_certificates`` (absolute path; ``None``: plaintext, ``insecure = true``). ``home``: default
    :func:`flwr_home`. Other connections in the file are kept; a new file starts from Flower's own default one.
    """
    import tomllib

    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    split_address(address)
    path = (home or flwr_home()) / "config.toml"
    config = tomllib.loads(path.read_text("utf-8") if path.exists() else DEFAULT_FLOWER_CONFIG_TOML)
    connection: dict[str, object] = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    config.setdefault("superlink", {})[name] = connection
    return atomic_write(path, lambda handle: handle.write(tomli_w.dumps(config).encode("utf-8")))


class FlowerProcess:
    """One Flower command in its own process group, its stdout and stderr in ``log_path``; a context manager.

    ``start()`` launches it (``env`` is added to this process's environment, with runtime dependency installation
    off). ``stop()`` ends it and every process it started (Flower detaches its SuperExec into a session of its own,
    so the group alone does not reach it): SIGTERM to each by pid, SIGKILL to any left after ``grace`` seconds.
    Leaving the ``with`` block stops it, also when the block raises.
    """

    def __init__(self, argv: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None,
                 cwd: Path | None = None, name: str | None = None) -> None:
        self.argv = list(argv)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **NO_RUNTIME_INSTALL_ENV, **(env or {})}
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def start(self) -> FlowerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    def poll(self) -> int | None:
        """The exit code once it has ended, else ``None``."""
        return None if self.process is None else self.process.poll()

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float, *, start: int = 0) -> re.Match[str]:
        """Wait until the log (from character ``start``) matches the regular expression ``pattern``.

        Raises :class:`FlowerProcessError` (with the log's tail) when the process ends first or ``timeout``
        seconds pass.
        """
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = compiled.search(self.log_text(), start)
            if found:
                return found
            if self.poll() is not None:
                raise FlowerProcessError(self._explain(f"ended (exit code {self.poll()}) before its log showed "
                                                       f"{pattern!r}"))
            if time.monotonic() > deadline:
                raise FlowerProcessError(self._explain(f"showed no {pattern!r} within {timeout:.0f} s"))
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        """Wait until it ends by itself; its exit code. Raises :class:`FlowerProcessError` after ``timeout``."""
        try:
            return self._started().wait(timeout)
        except subprocess.TimeoutExpired:
            raise FlowerProcessError(self._explain(f"still running after {timeout:.0f} s")) from None

    def stop(self, grace: float = 10.0) -> int | None:
        """End it and every process it started, by pid: SIGTERM, then SIGKILL after ``grace`` seconds.

        Returns its exit code (``None`` if it was never started). Safe to call more than once.
        """
        return self._end(signal.SIGTERM, grace)

    def kill(self) -> int | None:
        """SIGKILL it and every process it started, by pid, at once: a crash (no goodbye to anyone)."""
        return self._end(signal.SIGKILL, 0.0)

    def _end(self, first: signal.Signals, grace: float) -> int | None:
        if self.process is None:
            return None
        pids = [self.process.pid, *descendants(self.process.pid)]
        for pid in pids:
            _signal(pid, first)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            self.process.poll()  # reaps our child once it exits
            time.sleep(0.1)
        for pid in [*pids, *descendants(self.process.pid)]:
            if alive(pid):
                _signal(pid, signal.SIGKILL)
        return self.process.wait()

    def __enter__(self) -> FlowerProcess:
        return self if self.process is not None else self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process

    def _explain(self, what: str) -> str:
        return f"{self.name} (pid {self.pid}) {what}. Its log {self.log_path} ends:\n{self.log_tail()}"


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, their children ...), read from ``/proc`` (Linux).

    Written here rather than with psutil, which fedsr does not otherwise need.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent_pid(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first), or ``None`` if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()  # the name, in parentheses, may hold spaces


def _parent_pid(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped, does not)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------ flwr, local federation
def app_folder() -> Path:
    """The Flower app ``flwr run`` builds: the folder of fedsr's ``pyproject.toml`` (the source checkout this
    package runs from); raises FileNotFoundError with the fix when fedsr was installed without its source."""
    folder = Path(__file__).resolve().parents[1]
    if not (folder / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{folder / 'pyproject.toml'}: not found; flwr run needs fedsr's source folder. "
                                "Install fedsr from a source checkout: pip install -e PATH")
    return folder


def toml_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config`` parses it (TOML): strings quoted, booleans lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return repr(value)


def parse_json_output(text: str) -> Any:
    """The JSON document ``flwr ... --format json`` printed (anything before its first ``{`` is skipped)."""
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]


class FlwrCli:
    """Flower's ``flwr`` CLI against the SuperLink connection ``name`` of the config in ``flwr_home``.

    ``app_dir``: the Flower app ``flwr run`` builds (the folder of fedsr's pyproject.toml). ``processes``: the
    Flower processes whose logs' tails a failure message shows.
    """

    def __init__(self, flwr_home: Path, name: str = DEFAULT_FEDERATION, processes: Sequence[FlowerProcess] = (),
                 app_dir: Path | None = None) -> None:
        self.app_dir = app_dir or app_folder()
        self.flwr_home = Path(flwr_home)
        self.name = name
        self.env = {**os.environ, **NO_RUNTIME_INSTALL_ENV, "FLWR_HOME": str(self.flwr_home)}
        self._processes = list(processes)

    def processes(self) -> list[FlowerProcess]:
        return list(self._processes)

    def flwr(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([flower_executable("flwr"), *args], env=self.env, cwd=self.app_dir, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise FlowerProcessError(f"flwr {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def flwr_json(self, *args: str, timeout: float = 120) -> Any:
        return parse_json_output(self.flwr(*args, "--format", "json", timeout=timeout).stdout)

    def nodes(self) -> list[dict[str, Any]]:
        """Every registered node as ``flwr supernode list`` shows it (``node-id``, ``status`` ...)."""
        return list(self.flwr_json("supernode", "list", self.name)["nodes"])

    def wait_for_nodes(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """Wait until ``count`` nodes are online; those nodes. Raises with the logs' tails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            online = [node for node in self.nodes() if node["status"] == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise FlowerProcessError(f"{len(online)} of {count} SuperNodes online after {timeout:.0f} s\n"
                                         + self.log_tails())
            time.sleep(1.0)

    def start_run(self, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP_DIR NAME --run-config ...`` (``run_config``: run-config keys and values); the run id."""
        pairs = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
        out = self.flwr_json("run", str(self.app_dir), self.name, "--run-config", pairs, timeout=300)
        return int(out["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        """The run's row of ``flwr list`` (``status`` e.g. ``"running"``, ``"finished:completed"``)."""
        (row,) = self.flwr_json("list", self.name, "--run-id", str(run_id))["runs"]
        return dict(row)

    def wait_for_run(self, run_id: int, timeout: float) -> dict[str, Any]:
        """Wait until the run's status starts with ``finished``; its ``flwr list`` row."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.run_status(run_id)
            if str(row["status"]).startswith("finished"):
                return row
            if time.monotonic() > deadline:
                raise FlowerProcessError(f"run {run_id} is {row['status']} after {timeout:.0f} s\n"
                                         + self.log_tails())
            time.sleep(2.0)

    def log_tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}):\n{p.log_tail(lines)}" for p in self.processes())


class LocalFederation(FlwrCli):
    """A SuperLink (TLS + node authentication unless ``tls=False``) and SuperNodes on 127.0.0.1, ended by pid.

    Under ``root``: ``credentials/`` (CA, ``superlink.*`` for 127.0.0.1 and localhost, a key pair per site),
    ``flwr-home/config.toml`` (the SuperLink connection ``name``: ``self.env`` points ``flwr`` at it),
    ``superlink.db`` and ``logs/*.log``. ``tls=False``: the explicitly insecure SuperLink (plaintext, no node
    authentication). ``replace_credentials``: make new credentials over those of an earlier federation in ``root``.
    ``start()``/``stop()``, or a ``with`` block (stops everything, also on an error).
    """

    def __init__(self, root: Path, sites: Sequence[str], *, tls: bool = True, name: str = DEFAULT_FEDERATION,
                 app_dir: Path | None = None, replace_credentials: bool = False) -> None:
        super().__init__(Path(root) / "flwr-home", name, app_dir=app_dir)
        self.root = Path(root)
        self.sites = list(sites)
        self.tls = tls
        self.address = f"127.0.0.1:{free_port()}"
        self.database = self.root / "superlink.db"
        self.logs = self.root / "logs"
        self.credentials: CredentialPaths = write_credentials(
            self.root / "credentials", ["127.0.0.1", "localhost"], self.sites, force=replace_credentials).paths
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        write_federation(name, self.address, self.credentials.ca_cert if tls else None, home=self.flwr_home)
        self.superlink: FlowerProcess | None = None
        self.supernodes: dict[str, FlowerProcess] = {}  # each site's latest SuperNode
        self._started: list[FlowerProcess] = []  # every process ever started, to stop them all
        self._registered: set[str] = set()

    def processes(self) -> list[FlowerProcess]:
        return [p for p in (self.superlink, *self.supernodes.values()) if p is not None]

    def start(self) -> LocalFederation:
        """Start the SuperLink and wait until it serves (at most 90 s)."""
        self.superlink = self._launch(
            superlink_command(self.credentials if self.tls else None, self.database, self.address), "superlink")
        self.superlink.wait_for_log(r"Uvicorn running on", timeout=90)
        return self

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink (each with all it started), by pid."""
        for process in sorted(self._started, key=lambda p: p is self.superlink):
            process.stop()

    def restart_superlink(self) -> FlowerProcess:
        """Stop the SuperLink and start it again on the same address and database (runs, registered keys)."""
        if self.superlink is not None:
            self.superlink.stop()
        return self.start().superlink  # type: ignore[return-value]

    def register(self, site: str) -> int:
        """Register ``site``'s public key with the SuperLink (``flwr supernode register``); its node id."""
        out = self.flwr_json("supernode", "register", str(self.credentials.site_public_key(site)), self.name,
                             "--name", site)
        self._registered.add(site)
        return int(out["node-id"])

    def start_supernode(self, site: str, site_dir: Path, *, state_dir: Path | None = None, register: bool = True,
                        extra_args: Sequence[str] = (), device: str = "cpu") -> FlowerProcess:
        """Start ``site``'s SuperNode (its key registered first, once, unless ``register=False``); not yet online.

        Starting a site again (after :meth:`kill_supernode`) makes ``supernodes[site]`` the new process."""
        if register and self.tls and site not in self._registered:
            self.register(site)
        argv = supernode_command(self.address, Path(site_dir), credentials=self.credentials if self.tls else None,
                                 site=site, state_dir=state_dir, device=device, port=free_port())
        self.supernodes[site] = self._launch([*argv, *extra_args], f"supernode {site}", env=self.site_threads())
        return self.supernodes[site]

    def site_threads(self) -> dict[str, str]:
        """The environment that gives each SuperNode's training its share of this machine's cores.

        A hospital's SuperNode has its machine to itself and torch uses every core; here every site shares one
        machine, and sites training at once with a thread per core each oversubscribe it: OpenMP's waiting
        threads then spin against each other and a round took 20 times longer than in the simulation (whose
        workers Ray gives one share each)."""
        return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, len(self.sites))))}

    def kill_supernode(self, site: str) -> None:
        """SIGKILL ``site``'s SuperNode and what it started, by pid: a crash, no goodbye to the SuperLink."""
        self.supernodes[site].kill()

    def _launch(self, argv: Sequence[str], name: str, env: Mapping[str, str] | None = None) -> FlowerProcess:
        """Start ``argv`` with this federation's environment (plus ``env``) and a log file of its own,
        ``logs/NAME-N.log``."""
        number = sum(1 for p in self._started if p.name == name) + 1
        process = FlowerProcess(argv, self.logs / f"{name.replace(' ', '-')}-{number}.log",
                                env={**self.env, **(env or {})}, name=name)
        self._started.append(process)
        return process.start()

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
