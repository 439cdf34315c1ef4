"""``dromo-ray sweep SWEEP.yaml``: Ray Tune over the runtime; every trial is one MLflow run (edge layer).

A sweep file is a train config (the same sections and field names, or a ``base:`` config path that inline
sections override) plus the keys of the search::

    name: tiny                           # Tune experiment name: <storage_path>/<name>; default: the file's stem
    base: ../tasks/tiny_hopper_dromo.yaml  # a train config, relative to this file (optional)
    tracking: {experiment: sweep_tiny}   # any config section, overriding the base
    search:                              # dotted config keys -> one distribution each
      agent.algorithm: {grid: [dromo, combo]}
      agent.alpha: {loguniform: [0.1, 10.0]}   # also: choice [..], uniform [lo, hi], randint [lo, hi)
    seeds: [0, 1]                        # a grid over ``seed``: every point of the search runs every seed
    metric: final/normalized_score       # what the ranking (and a scheduler or searcher) uses
    mode: max
    num_samples: 1                       # repeats of the grid (samples of the non-grid distributions)
    max_concurrent_trials: 0             # 0: as many as the resources allow
    max_failures: 0                      # Tune retries of a failed trial (from its last checkpoint)
    scheduler: {type: asha, grace_period: 50000, reduction_factor: 3}    # optional; time_attr: step
    searcher: {type: basic, seed: 0}     # optional; basic (grid + random) or optuna (when installed)
    resources: {driver_cpus: 0.1, strategy: PACK}
    storage_path: dromo_runs/sweeps      # default: <out_dir>/sweeps

A comparison whose trials come from different presets names them as *arms* instead of one ``base:``; ``common:``
(dotted keys) applies to every arm, ``datasets:`` crosses every arm (``{env}`` in a base is each entry's env)::

    arms:
      dromo: {base: ../tasks/dromo_{env}.yaml}
      dromo_alpha_0.1: {base: ../tasks/dromo_{env}.yaml, set: {agent.alpha: 0.1}}
      combo: {base: ../tasks/combo_{env}.yaml}
    datasets:                            # all trials of the first entry run before the second's
      - {env: halfcheetah, dataset: halfcheetah-medium-v5}
      - {env: hopper, dataset: hopper-medium-v5}
    common: {train.total_steps: 25000, tracking.experiment: evidence}
    seeds: [0]

A trial's Tune config then names its ``arm`` and ``dataset`` (besides the searched keys and the seed); its run is
tagged ``sweep.arm``, its ``sweep.variant`` starts with ``arm=<name>`` (``dromo-ray report`` groups by it), and the
ranking is per dataset and arm.

Everything is validated before Ray starts a trial (:func:`load_sweep`, :func:`check_resources`): an unknown key, a
malformed distribution, a value that makes an invalid config, a missing dataset, or a trial that cannot fit the
cluster raises :class:`~dromo_ray.errors.ConfigError` naming the key.

Output: a progress table every ``$DROMO_SWEEP_PRINT_S`` seconds (15) and a line per finished trial, then a
ranking of the variants (mean ± std of the metric over seeds; only trials that finished count) and the trials;
``--json`` prints that summary as JSON on stdout and the progress on stderr. Exit status: 0, 1 when a trial
failed, 130 when interrupted, 2 for an invalid sweep file.

Modules: :mod:`~dromo_ray.sweep.schema` (the file's keys, pydantic), :mod:`~dromo_ray.sweep.spec` (the
resolved sweep), :mod:`~dromo_ray.sweep.resources` (placement groups), :mod:`~dromo_ray.sweep.trial` (one
trial), :mod:`~dromo_ray.sweep.callback` (progress, tables, the interrupt test hook), :mod:`~dromo_ray.sweep.tuner`
(:func:`run_sweep`). MLflow bookkeeping (parent run, trial runs) is in :mod:`dromo_ray.tracking`.
"""

from dromo_ray.runtime.cluster import Cluster
from dromo_ray.sweep.callback import SweepCallback, parse_interrupt, print_final, print_progress
from dromo_ray.sweep.resources import check_resources, placement_group_factory, trial_bundles
from dromo_ray.sweep.schema import Distribution, SweepFile
from dromo_ray.sweep.spec import ARM_KEY, DATASET_KEY, SweepSpec, compose_trial, load_sweep
from dromo_ray.sweep.trial import TrialContext, sweep_trainable, variant_label
from dromo_ray.sweep.tuner import SweepResult, TrialOutcome, rank, run_sweep

__all__ = ["load_sweep", "check_resources", "trial_bundles", "placement_group_factory", "Cluster", "SweepSpec",
           "SweepFile", "Distribution", "compose_trial", "ARM_KEY", "DATASET_KEY", "sweep_trainable",
           "TrialContext", "variant_label", "SweepCallback", "print_progress", "print_final", "parse_interrupt",
           "TrialOutcome", "SweepResult", "rank", "run_sweep"]
