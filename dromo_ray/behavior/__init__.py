"""Behaviour policies trained online with RLlib SAC, and the D4RL-v2-style dataset suite made from them.

- :mod:`dromo_ray.behavior.rllib_module`: the SAC / CQL RLModules used here (RLlib's defaults with the
  platform's log-std parametrisation, so that an exported policy is the *same* distribution).
- :mod:`dromo_ray.behavior.export`: RLModule pi network -> :class:`~dromo_ray.core.nets.TanhGaussianActor`
  -> the dromo_ray policy file (:mod:`dromo_ray.data.policy_io`), with a numerical parity check.
- :mod:`dromo_ray.behavior.replay_log`: the appendable D4RL-layout HDF5 log of every transition SAC collected.
- :mod:`dromo_ray.behavior.train`: ``dromo-ray behavior train``.
- :mod:`dromo_ray.behavior.suite`: ``dromo-ray suite make``.
- :mod:`dromo_ray.behavior.cql_rllib`: RLlib's CQL on an offline dataset (``algorithm: cql_rllib``).

Edge layer: imports ray and rllib, never imported by ``core`` or ``data``.
"""
