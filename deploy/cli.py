"""``fedsr deploy``: a real federation on Flower's deployment engine (SuperLink, SuperNodes, ``flwr run``).

- ``credentials DIR``: CA, the SuperLink's TLS certificate, one SuperNode key pair per site (deploy.credentials).
- ``superlink``: writes the ``flwr`` connection for this SuperLink into Flower's config, then becomes
  ``flower-superlink`` (TLS, node authentication, a database, no per-run dependency installation).
- ``register``: ``flwr supernode register`` of a site's public key, so that its SuperNode may connect.
- ``supernode``: becomes ``flower-supernode`` for one hospital (the CA, its key, its site folder in the node config).
- ``local``: all of it on 127.0.0.1 (``deploy.launch.LocalFederation``), ``flwr run`` to the end, progress as
  ``fedsr simulate`` prints it, every process ended by pid also on Ctrl-C, SIGTERM or a failure.

``superlink`` and ``supernode`` replace this process with Flower's (``exec``): the pid a service manager or a test
holds is Flower's, and its signals go straight to it. The ``fedsr`` root imports this module only when one of these
commands runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploy.credentials import (
    DEFAULT_DAYS, CredentialPaths, CredentialsError, certificate_hosts, check_private, check_site_name,
    write_credentials,
)
from deploy.launch import (
    DEFAULT_FEDERATION, DEFAULT_SUPERLINK_ADDRESS, DEFAULT_SUPERNODE_PORT, NO_RUNTIME_INSTALL_ENV, FlowerProcessError,
    LocalFederation, flower_executable, split_address, superlink_command, supernode_command, write_federation,
)
from shared_models.errors import ExplainedError

if TYPE_CHECKING:
    from server.settings import RunSettings

console = Console()
deploy_app = typer.Typer(name="deploy", no_args_is_help=True, add_completion=False,
                         pretty_exceptions_show_locals=False,  # locals can hold paths
                         help="Run a real federation: credentials, SuperLink, registered SuperNodes (Flower).")

INSECURE_HELP = "Plaintext, no node authentication: anyone on the network can read the weights and join. Tests only."
CREDENTIALS_OPTION = typer.Option(Path("credentials"), "--credentials", help="The folder fedsr deploy credentials wrote.")
FEDERATION_OPTION = typer.Option(DEFAULT_FEDERATION, "--federation",
                                 help="Name of the SuperLink connection in Flower's config (flwr run . NAME).")


@deploy_app.command("credentials")
def credentials(
    directory: Path = typer.Argument(..., help="Folder to write the credentials into (created owner-only)."),
    host: list[str] = typer.Option(..., "--host", help="A host name or IP address sites use to reach the SuperLink "
                                   "(repeat for each; all go into the certificate)."),
    site: list[str] = typer.Option([], "--site", help="A site (hospital) to make a SuperNode key pair for (repeat)."),
    days: int = typer.Option(DEFAULT_DAYS, "--days", help="Days the certificates stay valid."),
    force: bool = typer.Option(False, "--force", help="Replace credentials that exist (sites then need new ones)."),
) -> None:
    """Make a CA, the SuperLink's TLS certificate and one SuperNode key pair per site (private keys 0600)."""
    try:
        written = write_credentials(directory, host, site, days=days, force=force)
    except ExplainedError as error:
        _fail(error)
    paths = written.paths
    who = {paths.ca_cert: "everyone (SuperNodes, flwr)", paths.ca_key: "keep offline: signs certificates",
           paths.superlink_cert: "the coordinator", paths.superlink_key: "the coordinator only"}
    table = Table(title=f"credentials in {paths.root}")
    for column in ("file", "mode", "goes to"):
        table.add_column(column)
    for path in written.written:
        site_name = path.parent.name
        goes_to = who.get(path) or (f"site {site_name} only" if path.suffix == ".key"
                                    else f"site {site_name} and the coordinator (flwr supernode register)")
        table.add_row(escape(str(path.relative_to(paths.root))), f"{path.stat().st_mode & 0o777:o}", goes_to)
    console.print(table)
    for path in written.replaced:
        console.print(f"[yellow]replaced[/] {escape(str(path))}")
    console.print(f"certificate hosts: {', '.join(host)}")


@deploy_app.command("superlink")
def superlink(
    credentials_dir: Path = CREDENTIALS_OPTION,
    database: Path = typer.Option(..., "--database", help="SQLite file that keeps runs and registered sites."),
    address: str = typer.Option(DEFAULT_SUPERLINK_ADDRESS, "--address",
                                help="HOST:PORT to serve on. Flower 1.42 serves SuperNodes (Fleet API), flwr "
                                     "(Control API) and the ServerApp on this one address."),
    control_host: Optional[str] = typer.Option(None, "--control-host",
                                               help="Host name flwr uses to reach this SuperLink (default: the "
                                                    "certificate's first host)."),
    federation: str = FEDERATION_OPTION,
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Run flower-superlink in the foreground: TLS, SuperNode authentication, a database, the installed environment.

    First writes the SuperLink connection FEDERATION into Flower's config ($FLWR_HOME/config.toml, else
    ~/.flwr/config.toml), so that `flwr run . FEDERATION` and `fedsr deploy register` reach it.
    """
    paths = CredentialPaths(credentials_dir)
    try:
        host, port = split_address(address)
        if insecure:
            _warn_insecure("SuperLink")
            argv, root_certificates = superlink_command(None, database, address), None
            control_host = control_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
        else:
            paths.require(paths.ca_cert, paths.superlink_cert, paths.superlink_key)
            check_private(paths.superlink_key)
            argv, root_certificates = superlink_command(paths, database, address), paths.ca_cert
            control_host = control_host or certificate_hosts(paths.superlink_cert)[0]
        database.parent.mkdir(parents=True, exist_ok=True)
        config = write_federation(federation, f"{control_host}:{port}", root_certificates)
    except (ExplainedError, ValueError) as error:
        _fail(error)
    console.print(f"flwr connection [bold]{escape(federation)}[/] -> {escape(control_host)}:{port} "
                  f"written to {escape(str(config))}")
    _become(argv)


@deploy_app.command("register")
def register(
    credentials_dir: Path = CREDENTIALS_OPTION,
    site: str = typer.Option(..., "--site", help="The site whose supernode.pub to register."),
    federation: str = FEDERATION_OPTION,
) -> None:
    """Register a site's public key with the SuperLink (flwr supernode register), so that its SuperNode may join."""
    paths = CredentialPaths(credentials_dir)
    try:
        public_key = paths.site_public_key(check_site_name(site))
        paths.require(public_key)
    except ExplainedError as error:
        _fail(error)
    argv = [flower_executable("flwr"), "supernode", "register", str(public_key), federation, "--name", site]
    raise typer.Exit(subprocess.run(argv).returncode)


@deploy_app.command("supernode")
def supernode(
    credentials_dir: Path = CREDENTIALS_OPTION,
    site: str = typer.Option(..., "--site", help="This site's name (its key is CREDENTIALS/sites/NAME/supernode.key)."),
    superlink_address: str = typer.Option(..., "--superlink", help="The SuperLink's HOST:PORT (a host its "
                                          "certificate names)."),
    site_dir: Path = typer.Option(..., "--site-dir", help="This site's scans (check it first: fedsr sites check)."),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="Where the site keeps what outlives a run "
                                             "(privacy ledger, local layers); default: inside the site folder."),
    device: str = typer.Option("auto", "--device", help="Where this site trains: auto, cpu, cuda, cuda:N, mps."),
    port: int = typer.Option(DEFAULT_SUPERNODE_PORT, "--port",
                             help="Local port of the SuperNode's ClientApp API (127.0.0.1; one per SuperNode)."),
    insecure: bool = typer.Option(False, "--insecure", help=INSECURE_HELP),
) -> None:
    """Run flower-supernode in the foreground for one site: the CA, the site's key, its folders in the node config."""
    paths = CredentialPaths(credentials_dir)
    try:
        check_site_name(site)
        if not site_dir.is_dir():
            raise CredentialsError(site_dir, "not a folder", "Give --site-dir the folder with this site's scans")
        if insecure:
            _warn_insecure("SuperNode")
        else:
            paths.require(paths.ca_cert, paths.site_private_key(site))
            check_private(paths.site_private_key(site))
        argv = supernode_command(superlink_address, site_dir.resolve(), credentials=None if insecure else paths,
                                 site=site, state_dir=state_dir.resolve() if state_dir else None, device=device,
                                 port=port)
    except (ExplainedError, ValueError) as error:
        _fail(error)
    _become(argv)


@deploy_app.command("local")
def local(
    sites: Optional[int] = typer.Option(None, "--sites", min=1, help="Phantom sites to write into RUN_DIR/sites "
                                        "(default: num-sites, 3; ignored with --sites-dir)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder. Default: runs/<timestamp>."),
    sites_dir: Optional[Path] = typer.Option(None, "--sites-dir", help="Folder with one sub-folder per site "
                                             "(default: phantom sites)."),
    run_config: Optional[str] = typer.Option(None, "--run-config", metavar="'K=V K2=V2' | FILE.toml",
                                             help="Any run-config key, as flwr run and fedsr simulate take it "
                                                  "(strings quoted: loss='l1')."),
) -> None:
    """Run a whole federation on this machine through Flower's deployment engine.

    A SuperLink (TLS + SuperNode authentication) and one SuperNode per site on 127.0.0.1, `flwr run` to the end,
    the run folder in RUN_DIR (credentials, logs and the SuperLink's database in RUN_DIR/deploy). Ctrl-C, SIGTERM
    or a failure stops the run and every process.
    """
    from client.data.files import site_folders
    from simulation.cli import PHANTOM_SUBJECTS, settings_from_command_line

    start = time.perf_counter()
    given = {"num_sites": sites, "run_dir": run_dir and str(run_dir), "sites_dir": sites_dir and str(sites_dir)}
    try:
        settings = settings_from_command_line(given, run_config)
        folder = Path(settings.sites_dir) if settings.sites_dir else Path(settings.run_dir) / "sites"
        if not settings.sites_dir and not folder.exists():
            from simulation.phantoms import write_phantom_sites

            write_phantom_sites(folder, n_sites=settings.num_sites, subjects_per_site=PHANTOM_SUBJECTS,
                                seed=settings.seed)
        folders = [Path(f) for f in site_folders(folder)]
    except (ValueError, FileNotFoundError) as error:
        _fail(error)
    # The run config: the sites know their own folders (node config), so no sites-dir travels.
    settings = settings.replace(num_sites=len(folders), sites_dir="")
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM ends the federation as Ctrl-C does
    code = _run_locally(settings, folders)
    console.print(f"run folder: {escape(settings.run_dir)}  ({time.perf_counter() - start:.0f} s)", highlight=False)
    raise typer.Exit(code)


def _run_locally(settings: RunSettings, folders: list[Path]) -> int:
    """Bring the federation up, run it to the end, stop everything; the exit code (0, 1 failed, 130 stopped)."""
    run_dir = Path(settings.run_dir)
    names = [f"site-{number}" for number in range(1, len(folders) + 1)]  # key names; reports use site.toml's
    run_id = None
    with LocalFederation(run_dir / "deploy", names, replace_credentials=True) as fed:
        try:
            for name, folder in zip(names, folders):
                fed.start_supernode(name, folder, state_dir=run_dir / "deploy" / "state" / name,
                                    device=settings.device)
            fed.wait_for_nodes(len(names), timeout=max(settings.node_wait_seconds, 60.0))
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            run_id = fed.start_run(settings.to_config())
            console.print(f"flwr run {run_id} on SuperLink {fed.address} (TLS, {len(names)} registered SuperNodes); "
                          f"logs in {escape(str(fed.logs))}", highlight=False)
            status = _follow(fed, run_id, settings)
        except KeyboardInterrupt:
            if run_id is not None:
                fed.flwr("stop", str(run_id), fed.name, check=False, timeout=30)
            console.print("[yellow]stopped.[/] every process of the federation is ended.")
            return 130
        except FlowerProcessError as error:
            console.print(f"[red]the federation failed:[/] {escape(str(error))}", highlight=False)
            return 1
    if status != "finished:completed":
        console.print(f"[red]the run ended {escape(status)}[/]; logs in {escape(str(fed.logs))}:", highlight=False)
        console.print(fed.log_tails(), markup=False, highlight=False)
        return 1
    _print_results(run_dir, settings)
    return 0


def _follow(fed: LocalFederation, run_id: int, settings: RunSettings) -> str:
    """Show progress from the run folder's metrics.jsonl until flwr list says the run finished; its status."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from simulation.cli import current_part, expected_rows, main_experiment
    from simulation.progress import MetricsFollower, round_line

    run_dir = Path(settings.run_dir)
    follower = MetricsFollower(run_dir / "metrics.jsonl", main_experiment(settings))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    shown, status, checked = 0, "", 0.0
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("starting", total=expected_rows(settings))
        while not status.startswith("finished"):
            time.sleep(0.5)
            if time.monotonic() - checked > 5:  # flwr list is a process of its own: not too often
                status, checked = str(fed.run_status(run_id)["status"]), time.monotonic()
            follower.poll()
            progress.update(task, completed=len(follower.rows), description=current_part(run_dir))
            finished = [r for r in sorted(follower.rounds) if follower.finished_round(r, settings.required_sites)]
            for server_round in finished[shown:]:
                progress.console.print(round_line(server_round, follower.rounds[server_round]), markup=False,
                                       highlight=False)
            shown = max(shown, len(finished))
    return status


def _print_results(run_dir: Path, settings: RunSettings) -> None:
    """The tables ``fedsr simulate`` ends with: rounds, last scores, cross-site matrix; then the report's paths."""
    from simulation.cli import main_experiment
    from simulation.progress import print_run_end

    summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
    print_run_end(console, run_dir, main_experiment(settings), summary)


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _become(argv: list[str]) -> NoReturn:
    """Replace this process with ``argv`` (same pid), runtime dependency installation off."""
    console.print(f"[dim]$ {escape(' '.join(argv))}[/]", highlight=False, soft_wrap=True)
    console.file.flush()
    os.execve(argv[0], argv, {**os.environ, **NO_RUNTIME_INSTALL_ENV})


def _warn_insecure(what: str) -> None:
    console.print(f"[bold red]WARNING: --insecure: this {what} talks in plaintext without node authentication. "
                  "Anyone on the network can read the model and join the federation. Never use it with real "
                  "scans.[/]")


def _fail(error: Exception) -> NoReturn:
    console.print(f"[red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
