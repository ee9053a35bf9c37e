"""Warm ClientApp processes for a SuperNode: the site's libraries are imported once, not once per message.

Why our own executor: Flower 1.42's SuperNode runs every message (each round's ``train`` and ``evaluate``) in a
fresh ``flwr-clientapp`` process started by its SuperExec's subprocess executor. That process imports torch and
MONAI again, about 4-5 s of CPU on a small machine for every message, which made a deployed federation 7.5x slower
than the same one simulated. Flower keeps warm processes only in its Kubernetes executor. This module keeps one
warm process per SuperNode that has imported every library fedsr's ClientApp uses, and forks it for each task.
The fork runs Flower's own :func:`run_clientapp` (what ``flwr-clientapp`` runs: it pulls the message, installs
the FAB, loads the ClientApp and pushes the reply) and exits, so each message still runs in a process of its own
that ends with it, and the code it runs is the run's FAB: fedsr's own modules are dropped from the warm process
before it forks, so the child imports them from the FAB, as ``flwr-clientapp`` does. Everything else, the task
polling, the Runtime API client and its signal handling, is Flower's SuperExec (``run_superexec``), given this
executor in place of its subprocess one.

How it runs (:func:`supernode_argv`): ``python -m deploy.warm_clientapps -- flower-supernode ... --isolation
process --port P`` starts the warm executor as a child, watching its parent's pid, then becomes (exec, same pid)
``flower-supernode``, which serves the runtime API on 127.0.0.1:P and leaves the ClientApps to this executor. When
the SuperNode ends, the executor ends (Flower's parent monitor), and with it any ClientApp still running.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

#: Seconds between the executor's asks for a new task (Flower's SuperExec default: 1 s). A message already waits
#: for the SuperNode's own poll of the SuperLink (3 s when idle); this keeps the local hop short. Flower's knob.
TASK_POLL_INTERVAL_S = 0.1
#: fedsr's top-level packages: imported to warm their libraries, then dropped so that each task imports the FAB's.
PROJECT_PACKAGES = ("client", "shared_models", "server", "simulation", "deploy")
#: What fedsr's ClientApp imports at its first message (client.app defers its heavy stack to then).
CLIENTAPP_MODULES = ("client.app", "client.tasks", "client.cross_site", "shared_models.registry")
#: This module's import name (``__name__`` is ``__main__`` when it runs as ``python -m``).
MODULE = "deploy.warm_clientapps"


class ForkingExecutor:
    """Flower's SuperExec ``Executor`` protocol: each ClientApp task runs in a fork of this warm process.

    Tasks of other kinds (none on a SuperNode today) go to Flower's subprocess executor. Finished children are
    reaped in :meth:`reconcile`, which SuperExec calls before every poll; :meth:`close` ends those still running.
    """

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self._others = SubprocessExecutor()
        self._children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types: set, *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set, set[str]]:
        del insecure, root_certificates_path
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: object = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec):  # spec: flwr ExecutionSpec -> flwr LaunchResult
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self._others.launch(spec)
        certificates = Path(spec.root_certificates_path).read_bytes() if spec.root_certificates_path else None
        pid = os.fork()
        if pid == 0:  # the child: one task, then exit without running the warm process's exit handlers
            os._exit(_run_one_clientapp(spec.runtime_api_address, spec.token, spec.insecure, certificates,
                                        spec.parent_pid))
        self._children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        for pid in list(self._children):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)

    def close(self) -> None:
        import signal

        for pid in self._children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._children.clear()


def _run_one_clientapp(address: str, token: str, insecure: bool, certificates: bytes | None,
                       parent_pid: int | None) -> int:
    """Flower's ClientApp runtime for one task (in the forked child); its exit code."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(runtime_api_address=address, token=token, insecure=insecure, certificates=certificates,
                      parent_pid=parent_pid, runtime_dependency_install=False)
    except SystemExit as end:  # run_clientapp ends with flwr_exit, i.e. sys.exit(code)
        return end.code if isinstance(end.code, int) else 1
    except BaseException:  # noqa: BLE001  (logged by Flower already; the task is reported failed to the SuperNode)
        return 1
    return 0


def warm_up() -> list[str]:
    """Import everything fedsr's ClientApp imports, then drop fedsr's own modules (the libraries stay loaded);
    returns the names of the library modules now loaded."""
    for name in CLIENTAPP_MODULES:
        importlib.import_module(name)
    for name in [name for name in sys.modules if name.split(".")[0] in PROJECT_PACKAGES]:
        if name not in (MODULE, "__main__"):
            del sys.modules[name]
    return sorted(sys.modules)


def serve(runtime_api_address: str, parent_pid: int) -> None:
    """Be the SuperNode's SuperExec with :class:`ForkingExecutor` (runs until the SuperNode ``parent_pid`` ends)."""
    warm_up()
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(TASK_POLL_INTERVAL_S))
    from flwr.supercore.superexec import run_superexec as superexec

    # Flower 1.42 picks the executor by type in run_superexec (get_executor); its loop is reused as it is.
    superexec.get_executor = lambda *args, **kwargs: ForkingExecutor()
    superexec.run_superexec(runtime_api_address=runtime_api_address, insecure=True, parent_pid=parent_pid,
                            runtime_dependency_install=False)


def supernode_argv(flower_supernode_argv: Sequence[str]) -> list[str]:
    """The command that runs ``flower-supernode ARGS`` with warm ClientApps (``--isolation process`` added)."""
    return [sys.executable, "-m", MODULE, "--", *flower_supernode_argv, "--isolation", "process"]


def _runtime_port(argv: Sequence[str]) -> int:
    """The runtime API port of a ``flower-supernode`` argv (``--port``; Flower's default 9094)."""
    from deploy.launch import DEFAULT_SUPERNODE_PORT

    args = list(argv)
    return int(args[args.index("--port") + 1]) if "--port" in args else DEFAULT_SUPERNODE_PORT


def main(argv: Sequence[str] | None = None) -> None:
    """``-- flower-supernode ...``: start the warm executor for it, then become it; ``--serve ADDR --parent-pid
    PID``: be the executor (started by the former)."""
    import subprocess

    parser = argparse.ArgumentParser(prog="python -m deploy.warm_clientapps", description=__doc__.split("\n")[0])
    parser.add_argument("--serve", metavar="HOST:PORT", help="the SuperNode's runtime API to serve")
    parser.add_argument("--parent-pid", type=int, help="end when this process (the SuperNode) ends")
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- flower-supernode ARGS")
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.parent_pid)
        return
    supernode = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if not supernode:
        parser.error("give the flower-supernode command after --")
    subprocess.Popen([sys.executable, "-m", MODULE, "--serve", f"127.0.0.1:{_runtime_port(supernode)}",
                      "--parent-pid", str(os.getpid())])
    os.execv(supernode[0], supernode)


if __name__ == "__main__":
    main()
