"""The coordinator's run settings: the sites' settings plus those that stay with the coordinator.

Every key of pyproject's ``[tool.flwr.app.config]`` is a field here or in :class:`shared_models.settings.SiteSettings`
(which travel to the sites), or an option of a model family (``<family>.<option>``, declared by the family). The
ServerApp reads them from ``context.run_config`` (``flwr run``); ``fedsr simulate`` builds the same run config from
its flags and ``--run-config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from shared_models.registry import family_options_types, model_problems
from shared_models.settings import FamilyOptions, PlainValue, SiteSettings, setting, unknown_keys


#: The reference models a run can train beside the federated one (``baselines``).
BASELINES = ("local", "pooled")
#: ``strategy`` choices: Flower's strategies, each wrapped by fedsr's sampling, validation and record.
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")


@dataclass(frozen=True)
class RunSettings(SiteSettings):
    """Everything that shapes a federated run. Times are in seconds.

    ``options``: every registered family's options (``{family: FamilyOptions}``); the chosen family's travel to the
    sites with the round config.
    """

    num_sites: int = setting(3, "Sites in the federation (simulation: phantom sites to generate).", flag="--sites",
                             minimum=1)
    min_sites: int = setting(2, "Sites that must reply usably in every round for the run to go on.",
                             flag="--min-sites", minimum=1)
    evaluate_round_zero: bool = setting(True, "Score the untrained model at every site before round 1.")
    node_wait_seconds: float = setting(120.0, "How long to wait for the sites to connect.", minimum=0)
    round_timeout: float = setting(3600.0, "How long one round may take before missing replies are given up.",
                                   positive=True)
    run_dir: str = setting("", "Run folder (metrics, checkpoints, summary). Default: runs/<timestamp>.",
                           flag="--run-dir")
    sites_dir: str = setting("", "Simulation: folder with one sub-folder per site. Default: phantom sites.",
                             flag="--sites-dir")
    baselines: str = setting(
        "local", "Reference models trained beside the federated one: local (each site alone, same compute), "
        "local,pooled (plus all data pooled: simulation only) or none.", flag="--baselines",
    )
    holdout_site: str = setting("", "Train without this site (its site.toml name) and score it as an unseen scanner.",
                                flag="--holdout-site")
    leave_one_out: bool = setting(False, "Also train one federation without each site in turn and score every "
                                  "held-out site as an unseen scanner.", flag="--leave-one-out")
    resume: bool = setting(False, "Continue the run in run-dir from its last completed round (its checkpoint.pt); "
                           "every other setting must equal the run's config.toml.")
    strategy: str = setting("fedavg", "Aggregation: Flower's fedavg, fedprox, fedadam, fedyogi, fedmedian, "
                            "fedtrimmedavg or krum.", flag="--strategy", choices=STRATEGIES)
    proximal_mu: float = setting(0.01, "FedProx: weight mu of the proximal term (mu/2)*||w - w_global||^2 in every "
                                 "site's local loss.", flag="--proximal-mu", minimum=0)
    server_learning_rate: float = setting(0.01, "FedAdam/FedYogi: the server optimiser's learning rate (eta).",
                                          flag="--server-lr", positive=True)
    server_beta1: float = setting(0.9, "FedAdam/FedYogi: first-moment decay of the server optimiser.", minimum=0)
    server_beta2: float = setting(0.99, "FedAdam/FedYogi: second-moment decay of the server optimiser.", minimum=0)
    server_tau: float = setting(0.001, "FedAdam/FedYogi: the server optimiser's adaptivity (tau).", positive=True)
    trim_fraction: float = setting(0.2, "FedTrimmedAvg: fraction of the sites' values cut from each end per weight.",
                                   minimum=0)
    krum_byzantine: int = setting(1, "Krum: number of sites assumed malicious.", minimum=0)
    fraction_train: float = setting(1.0, "Fraction of the connected sites sampled for training in each round (at "
                                    "least min-sites).", flag="--fraction-train", positive=True)
    fraction_evaluate: float = setting(1.0, "Fraction of the connected sites sampled for evaluation in each round "
                                       "(at least min-sites).", flag="--fraction-evaluate", positive=True)
    update_norm_limit: float = setting(5.0, "Reject a train update whose distance from the global weights exceeds "
                                       "this multiple of the round's median distance (0: off).", minimum=0)
    max_num_examples: int = setting(10_000_000, "Absolute cap on a reply's num-examples (a larger claim is "
                                    "rejected).", minimum=1)
    options: Mapping[str, FamilyOptions] = field(default_factory=lambda: _default_options())

    @property
    def required_sites(self) -> int:
        """Sites that must reply in every round for the run to go on (never more than the federation has)."""
        return min(self.min_sites, self.num_sites)

    @property
    def baseline_kinds(self) -> tuple[str, ...]:
        """The reference models ``baselines`` asks for, a subset of :data:`BASELINES` (empty for ``none``)."""
        words = tuple(word.strip() for word in self.baselines.split(",") if word.strip())
        return () if words == ("none",) else words

    @property
    def family_options(self) -> FamilyOptions | None:
        """The chosen model family's options (None for a family that declares none)."""
        return self.options.get(self.model)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build from a Flower run config (flat kebab-case keys, family options as ``family.option``).

        Missing keys take their defaults. Raises ValueError naming unknown keys and bad values.
        """
        option_types = family_options_types()
        unknown = unknown_keys(run_config, cls, *option_types.values())
        if unknown:
            known = [d.key for kind in (cls, *option_types.values()) for d in kind.declared()]
            raise ValueError(f"unknown run-config keys {unknown}; known keys: {', '.join(known)}")
        options = {name: kind.parse(run_config) for name, kind in option_types.items()}
        return cls.parse(run_config, options=options)

    def to_config(self) -> dict[str, PlainValue]:
        """The flat run config (``config.toml``, ``flwr run --run-config``): every setting and family option."""
        flat = super().to_config()
        for options in self.options.values():
            flat.update(options.to_config())
        return flat

    def round_config(self) -> dict[str, PlainValue]:
        """What travels to the sites each round: the site settings and the chosen family's options."""
        values: dict[str, PlainValue] = dict(self.site_settings().to_config())
        if self.family_options is not None:
            values.update(self.family_options.to_config())
        return values

    def problems(self) -> list[str]:
        problems = super().problems()
        problems += model_problems(self.model, self.model_preset, self.spatial_dims)
        unknown = [word for word in self.baseline_kinds if word not in BASELINES]
        if unknown or len(set(self.baseline_kinds)) != len(self.baseline_kinds):
            problems.append(f"baselines must be 'none' or a comma-separated list of {', '.join(BASELINES)}, "
                            f"got {self.baselines!r}")
        if self.resume and not self.run_dir:
            problems.append("resume needs run-dir: the folder of the run to continue")
        if self.holdout_site and self.leave_one_out:
            problems.append("holdout-site and leave-one-out exclude each other: leave-one-out holds out every site "
                            "in turn")
        declared = {d.name: d for d in self.declared()}
        for name in ("fraction_train", "fraction_evaluate"):
            if getattr(self, name) > 1:
                problems.append(f"{declared[name].key} must be <= 1 (a fraction of the connected sites), got "
                                f"{getattr(self, name)!r}")
        for name in ("server_beta1", "server_beta2"):
            if getattr(self, name) >= 1:
                problems.append(f"{declared[name].key} must be < 1 (a decay rate), got {getattr(self, name)!r}")
        if self.trim_fraction >= 0.5:
            problems.append(f"trim-fraction must be < 0.5 (cut from each end of the sites' values), got "
                            f"{self.trim_fraction!r}")
        return problems + self._inactive_strategy_settings()

    def _inactive_strategy_settings(self) -> list[str]:
        """A strategy setting changed for a strategy that does not use it (it would do nothing: refused, with the
        strategies it acts with)."""
        users = {"proximal_mu": ("fedprox",), "server_learning_rate": ("fedadam", "fedyogi"),
                 "server_beta1": ("fedadam", "fedyogi"), "server_beta2": ("fedadam", "fedyogi"),
                 "server_tau": ("fedadam", "fedyogi"), "trim_fraction": ("fedtrimmedavg",),
                 "krum_byzantine": ("krum",)}
        defaults = {d.name: d for d in self.declared()}
        return [f"{defaults[name].key} acts only with strategy = {' or '.join(map(repr, needs))}, not "
                f"{self.strategy!r}: set strategy or leave {defaults[name].key} out" for name, needs in users.items()
                if self.strategy not in needs and getattr(self, name) != defaults[name].default]


def _default_options() -> dict[str, FamilyOptions]:
    return {name: kind() for name, kind in family_options_types().items()}
