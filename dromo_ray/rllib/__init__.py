"""Everything that imports ``ray.rllib``: RLlib SAC for behaviour policies, RLlib CQL as a baseline.

- :mod:`dromo_ray.rllib.module`: the SAC / CQL RLModules used here (RLlib's defaults with the platform's log-std
  parametrisation, so that an exported policy is the *same* distribution).
- :mod:`dromo_ray.rllib.export`: RLModule pi network -> :class:`~dromo_ray.core.nets.TanhGaussianActor` -> the
  dromo_ray policy file (:mod:`dromo_ray.data.policy_io`), with a numerical parity check.
- :mod:`dromo_ray.rllib.algo`: an RLlib Algorithm built the platform's way (env registered, logs in the run).
- :mod:`dromo_ray.rllib.replay_log`: the appendable D4RL-layout HDF5 log of every transition SAC collected.
- :mod:`dromo_ray.rllib.sac`: ``dromo-ray behavior train --backend rllib`` as a library call
  (:class:`~dromo_ray.rllib.sac.BehaviorConfig` -> :func:`~dromo_ray.rllib.sac.train_behavior`).
- :mod:`dromo_ray.rllib.cql`: RLlib's CQL on an offline dataset (``algorithm: cql_rllib``).

An edge of the house: it imports core, data and runtime (to start Ray), never the other way round. What it hands
to the floors below is files: a behaviour run's directory (``index.json``, policy files, ``replay.hdf5``) in the
format that :func:`dromo_ray.data.policy_io.load_index` and ``dromo-ray suite make`` read without RLlib.
"""
