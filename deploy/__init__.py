"""Real multi-site deployment on Flower's own engine (``flower-superlink``, ``flower-supernode``, ``flwr run``).

- :mod:`deploy.credentials`: the CA, the SuperLink's TLS certificate, one SuperNode key pair per site.
- :mod:`deploy.launch`: the exact argv of each Flower process, processes started and ended by pid, Flower's
  ``flwr`` connection config, and a whole federation on 127.0.0.1 (``LocalFederation``).
- :mod:`deploy.cli`: ``fedsr deploy credentials | superlink | register | supernode | local``.

Imports neither the simulator nor Ray at import time; ``fedsr deploy local`` borrows the simulator's settings
parsing, phantom sites and progress tables when it runs.
"""
