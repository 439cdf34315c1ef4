"""Online SAC in the real Gymnasium v5 environment: the behaviour policies the suite's datasets come from.

(One file over ~500 lines, for one reason: exact resume. The run's state, its saving at episode boundaries, the
loop that must replay identically after a resume, and the replay-by-actions check all read and write the same
fields; split, each part would need the others' internals.)

    dromo-ray behavior train --env hopper --steps 1000000 --out behavior/hopper --seed 0
    dromo-ray behavior train --resume behavior/hopper            # after an interruption, or to train longer

The agent is the project's own SAC core (:class:`dromo_ray.core.agents.sac.SACAgent`: twin critics, learned
temperature, Polyak targets) fed from a replay buffer of the run's own transitions: one environment step,
then one update of ``batch_size`` rows (SAC's usual update-to-data ratio of 1) after ``learning_starts``
uniformly random steps. RLlib's SAC did about 10 env steps/s here (one env step and one update per RLlib
iteration, with its per-iteration bookkeeping); this loop is bound by the update itself
(``dromo-ray bench behavior`` prints both figures).

Episodes are reset with seeds derived from the run's seed and the episode's number (:func:`episode_seed`),
so the environment's state is a function of the counters: the run checkpoints at episode boundaries (every
``checkpoint_minutes``, and when it stops), and a resumed run continues bitwise where the checkpoint was. The
same property makes the replay log cheap: the run's transitions are a deterministic function of its actions
and its seed (:func:`replay_actions` replays them in the real environment), which is how ``medium-replay``
ships as actions only.

Writes under ``out``::

    config.json                the run's settings
    index.json                 every evaluated checkpoint with its returns (the format ``suite make`` reads)
    policies/step_XXXXXXXX.pt  each checkpoint's actor as a dromo_ray policy file
    replay.hdf5                every transition, in order (D4RL layout), written when the run stops
    progress.jsonl             training metrics every ``log_every`` steps
    state/state.pt             the resumable state (networks, optimisers, temperature, buffer, RNGs, counters)

Shapes: N env steps so far, D_o / D_a observation / action dims.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dromo_ray.core.agents.sac import SACAgent
from dromo_ray.core.config import AgentConfig
from dromo_ray.core.files import atomic_path, write_text_atomic
from dromo_ray.core.types import Batch, MixedBatch
from dromo_ray.data.dataset import OfflineDataset
from dromo_ray.data.gym_env import env_spec, evaluate_policy, make_env, package_versions
from dromo_ray.data.policy_io import INDEX_FORMAT, load_policy, save_policy
from dromo_ray.errors import DatasetError

STATE_FORMAT = "dromo_ray.online_sac_state/1"
ACTIONS_FORMAT = "dromo_ray.replay_actions/1"


@dataclass
class OnlineSACConfig:
    """One online SAC run. Defaults are SAC's published MuJoCo settings (Haarnoja et al. 2018, Table 1:
    Adam 3e-4 for every network and the temperature, γ 0.99, τ 0.005, batch 256, 2×256 ReLU networks,
    10^6 replay rows, target entropy -|A|), as D4RL's behaviour policies used."""

    env: str
    """hopper, halfcheetah or walker2d (Gymnasium v5; walker2d with the v2-v4 foot friction)."""
    steps: int = 1_000_000
    """Env steps to train for (D4RL's behaviour runs: 1M)."""
    out: str = ""
    """Output directory (default ``behavior_<env>``); must be fresh unless resuming."""
    seed: int = 0
    hidden: tuple[int, ...] = (256, 256)
    batch_size: int = 256
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005
    learning_starts: int = 5_000
    """Uniformly random env steps before the first update."""
    buffer_capacity: int = 1_000_000
    eval_every: int = 10_000
    """Env steps between evaluated policy checkpoints."""
    eval_episodes: int = 10
    """Episodes per evaluation and action mode (deterministic tanh(mu), and sampled)."""
    eval_seed: int = 1_000_000
    """Base seed of the evaluation environments (separate from training)."""
    checkpoint_minutes: float = 5.0
    """Wall minutes between resumable state checkpoints (taken at the next episode boundary)."""
    log_every: int = 1_000
    max_episode_steps: int = 1000
    time_limit_s: float = 0.0
    """Stop (with a resumable checkpoint) after this many seconds of this sitting; 0: no limit."""
    final_eval: bool = True
    """Evaluate (and save a policy checkpoint) when the step budget is reached; the benchmark turns it off."""

    def validate(self) -> OnlineSACConfig:
        self.env = env_spec(self.env).key
        for name in ("steps", "batch_size", "buffer_capacity", "eval_every", "eval_episodes", "log_every",
                     "max_episode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_starts", "seed", "time_limit_s", "checkpoint_minutes", "eval_seed"):
            v = getattr(self, name)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for name in ("actor_lr", "critic_lr", "alpha_lr", "tau"):
            v = getattr(self, name)
            if not (0 < v < np.inf):
                raise ValueError(f"{name} must be > 0, got {v}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"gamma must be in (0, 1), got {self.gamma}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive widths, got {self.hidden}")
        self.hidden = tuple(int(h) for h in self.hidden)
        if not self.out:
            self.out = f"behavior_{self.env}"
        return self

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> OnlineSACConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d).validate()

    def agent_config(self) -> AgentConfig:
        """The SAC core's config: MBPO's agent (no critic terms, no penalty) fed dataset-only batches."""
        return AgentConfig(algorithm="mbpo", hidden_dims=self.hidden, actor_lr=self.actor_lr,
                           critic_lr=self.critic_lr, entropy_lr=self.alpha_lr, gamma=self.gamma, tau=self.tau,
                           batch_size=self.batch_size, auto_entropy=True, init_entropy_coef=1.0,
                           target_entropy=None)


def episode_seed(seed: int, episode: int) -> int:
    """The reset seed of episode ``episode`` of a run seeded ``seed`` (independent streams per episode)."""
    return int(np.random.SeedSequence([int(seed), int(episode)]).generate_state(1, dtype=np.uint32)[0])


def versions() -> dict[str, str]:
    return {**package_versions(), "torch": torch.__version__.split("+")[0], "numpy": np.__version__}


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


class _Stop(Exception):
    pass


class OnlineSAC:
    """The training loop. ``OnlineSAC(cfg).run()`` for a fresh run, ``OnlineSAC.resume(out).run()`` after one
    stopped (optionally with more ``steps``)."""

    def __init__(self, cfg: OnlineSACConfig, *, progress: bool = False, log: Any = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.spec = env_spec(cfg.env)
        self.out = Path(cfg.out)
        self.progress, self.log = progress, log
        self.agent = SACAgent(cfg.agent_config(), self.spec.obs_dim, self.spec.act_dim, seed=cfg.seed)
        cap = int(cfg.buffer_capacity)
        d_o, d_a = self.spec.obs_dim, self.spec.act_dim
        # The replay buffer as preallocated tensors (rows [0, size) filled; ring once full).
        self.buf = {"obs": torch.zeros(cap, d_o), "act": torch.zeros(cap, d_a), "rew": torch.zeros(cap),
                    "next_obs": torch.zeros(cap, d_o), "done": torch.zeros(cap), "timeout": torch.zeros(cap,
                    dtype=torch.bool)}
        self.size = self.ptr = 0
        self.env_steps = self.episodes = self.updates = 0
        self.rng = np.random.default_rng(cfg.seed)  # random warm-up actions
        self.sample_gen = torch.Generator().manual_seed(cfg.seed + 2)  # batch row indices
        self.index: dict[str, Any] = {}
        self.train_returns: list[float] = []
        self._empty = Batch(*(torch.zeros(0, *s) for s in ((d_o,), (d_a,), (), (d_o,), (), ())))
        self.wall_s = 0.0
        self.timing = {"env_s": 0.0, "update_s": 0.0, "eval_s": 0.0, "learning_wall_s": 0.0, "learning_steps": 0}

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def resume(cls, out: str | os.PathLike, steps: int | None = None, time_limit_s: float = 0.0,
               **kw: Any) -> OnlineSAC:
        """The run in ``out`` at its last checkpoint; ``steps`` a new total, ``time_limit_s`` this sitting's limit
        (a time limit is never inherited from the sitting that stopped)."""
        out = Path(out)
        cfg_path = out / "config.json"
        if not cfg_path.exists() or not (out / "state" / "state.pt").exists():
            raise DatasetError(str(out), "no resumable online SAC run here (config.json and state/state.pt)")
        cfg = OnlineSACConfig.from_json(json.loads(cfg_path.read_text()))
        cfg.out = str(out)
        cfg.time_limit_s = float(time_limit_s)
        if steps is not None:
            cfg.steps = int(steps)
        self = cls(cfg, **kw)
        self._load(out / "state" / "state.pt")
        return self

    def _fresh_out(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            raise FileExistsError(f"{self.out} is not empty; choose a fresh --out (or --resume {self.out})")
        (self.out / "policies").mkdir(parents=True, exist_ok=True)
        (self.out / "state").mkdir(exist_ok=True)
        _write_json(self.out / "config.json", self.cfg.to_json())
        self.index = {"format": INDEX_FORMAT, "env": self.spec.key, "gym_id": self.spec.gym_id,
                      "env_model": self.spec.model, "seed": self.cfg.seed, "algorithm": "dromo_ray_sac",
                      "replay_log": "replay.hdf5", "config": self.cfg.to_json(), "versions": versions(),
                      "checkpoint_every": self.cfg.eval_every, "complete": False, "checkpoints": []}
        _write_json(self.out / "index.json", self.index)

    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {
            "format": STATE_FORMAT, "config": json.dumps(self.cfg.to_json()),
            "agent": self.agent.state_dict(),
            "buffer": {k: v[:n].clone() for k, v in self.buf.items()}, "size": n, "ptr": self.ptr,
            "env_steps": self.env_steps, "episodes": self.episodes, "updates": self.updates,
            "rng": json.dumps(self.rng.bit_generator.state), "sample_gen": self.sample_gen.get_state(),
            "index": json.dumps(self.index), "train_returns": torch.tensor(self.train_returns, dtype=torch.float64),
            "wall_s": float(self.wall_s),
        }

    def _load(self, path: Path) -> None:
        try:
            st = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem is a bad file
            raise DatasetError(str(path), f"not a resumable state ({type(e).__name__}: {e})") from None
        if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
            raise DatasetError(str(path), f"not an online SAC state (format {STATE_FORMAT})", "format")
        saved = json.loads(st["config"])
        for k in ("env", "seed", "hidden", "batch_size", "buffer_capacity"):
            if saved[k] != self.cfg.to_json()[k]:
                raise DatasetError(str(path), f"state was made with {k}={saved[k]!r}, config says "
                                   f"{self.cfg.to_json()[k]!r}", k)
        self.agent.load_state_dict(st["agent"])
        n = int(st["size"])
        for k, v in st["buffer"].items():
            self.buf[k][:n] = v
        self.size, self.ptr = n, int(st["ptr"])
        self.env_steps, self.episodes, self.updates = int(st["env_steps"]), int(st["episodes"]), int(st["updates"])
        self.rng.bit_generator.state = json.loads(st["rng"])
        self.sample_gen.set_state(st["sample_gen"])
        self.index = json.loads(st["index"])
        self.train_returns = [float(x) for x in st["train_returns"].tolist()]
        self.wall_s = float(st["wall_s"])
        # What was written after this state (evaluations of steps past it) is redone, identically.
        _write_json(self.out / "index.json", self.index)
        _write_json(self.out / "config.json", self.cfg.to_json())

    def save_state(self) -> None:
        path = self.out / "state" / "state.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)

    # ------------------------------------------------------------------------------------------------------
    def _add(self, obs: np.ndarray, act: np.ndarray, rew: float, next_obs: np.ndarray, term: bool,
             timeout: bool) -> None:
        i = self.ptr
        self.buf["obs"][i] = torch.from_numpy(obs)
        self.buf["act"][i] = torch.from_numpy(act)
        self.buf["rew"][i] = rew
        self.buf["next_obs"][i] = torch.from_numpy(next_obs)
        self.buf["done"][i] = float(term)
        self.buf["timeout"][i] = timeout
        self.ptr = (i + 1) % self.cfg.buffer_capacity
        self.size = min(self.size + 1, self.cfg.buffer_capacity)

    def _batch(self) -> MixedBatch:
        idx = torch.randint(0, self.size, (self.cfg.batch_size,), generator=self.sample_gen)
        b = self.buf
        real = Batch(b["obs"][idx], b["act"][idx], b["rew"][idx], b["next_obs"][idx], b["done"][idx],
                     torch.zeros(self.cfg.batch_size))
        return MixedBatch(real, self._empty)

    def _evaluate_checkpoint(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        name = f"step_{self.env_steps:08d}"
        rel = f"policies/{name}.pt"
        save_policy(self.out / rel, self.agent.actor, meta={
            "env_key": self.spec.key, "env_id": self.spec.gym_id, "env_model": self.spec.model,
            "env_steps": self.env_steps, "seed": self.cfg.seed, "checkpoint": name, "algorithm": "dromo_ray_sac"})
        ev = evaluate_policy_file(self.out / rel, self.spec.key, self.cfg.eval_episodes, self.cfg.eval_seed,
                                  self.cfg.max_episode_steps)
        recent = self.train_returns[-10:]
        entry = {"name": name, "policy": rel, "env_steps": self.env_steps, "replay_rows": self.env_steps,
                 "updates": self.updates, "wall_s": round(self.wall_s, 1), **ev,
                 "eval_episodes": self.cfg.eval_episodes, "eval_seed": self.cfg.eval_seed,
                 "train_return_last10": float(np.mean(recent)) if recent else None}
        self.index["checkpoints"].append(entry)
        self.index["final"] = name
        self.index["env_steps"] = self.env_steps
        _write_json(self.out / "index.json", self.index)
        self.timing["eval_s"] += time.perf_counter() - t0
        return entry

    # ------------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train until ``cfg.steps`` env steps (or the time limit / a signal: then a resumable stop)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        if not self.index:
            self._fresh_out()
        if self.env_steps > cfg.steps:
            raise ValueError(f"the run already has {self.env_steps} env steps, more than steps={cfg.steps}")
        self.index["complete"] = False
        stop: list[str] = []

        def on_signal(signum, _frame):
            stop.append(signal.Signals(signum).name)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        env = make_env(self.spec.key, max_episode_steps=cfg.max_episode_steps)
        low, high = env.action_space.low, env.action_space.high
        t_start = time.perf_counter()
        wall0 = self.wall_s
        last_ckpt = t_start
        bar = tqdm(total=cfg.steps, initial=self.env_steps, desc=f"SAC {self.spec.gym_id}", unit="step",
                   disable=not self.progress, mininterval=2.0)
        progress_f = open(self.out / "progress.jsonl", "a")  # noqa: SIM115 - closed in finally
        metrics: dict[str, Any] = {}
        stopped = ""
        t_learn0: float | None = None
        steps_learn0 = 0
        try:
            while self.env_steps < cfg.steps:
                # ---- episode boundary: the only place state is saved, so resume needs no env state ----
                now = time.perf_counter()
                self.wall_s = wall0 + now - t_start
                if stop or (cfg.time_limit_s and now - t_start >= cfg.time_limit_s):
                    stopped = stop[0] if stop else f"time limit {cfg.time_limit_s:g}s"
                    break
                if now - last_ckpt >= 60.0 * cfg.checkpoint_minutes:
                    self.save_state()
                    last_ckpt = time.perf_counter()
                obs, _ = env.reset(seed=episode_seed(cfg.seed, self.episodes))
                ep_ret, done = 0.0, False
                while not done and self.env_steps < cfg.steps:
                    t0 = time.perf_counter()
                    if self.env_steps < cfg.learning_starts:
                        a = self.rng.uniform(low, high).astype(np.float32)
                    else:
                        a = self.agent.act(obs, deterministic=False).astype(np.float32)
                    next_obs, rew, term, trunc, _ = env.step(a)
                    self._add(np.asarray(obs, np.float32), a, float(rew), np.asarray(next_obs, np.float32),
                              bool(term), bool(trunc and not term))
                    ep_ret += float(rew)
                    self.env_steps += 1
                    done = bool(term or trunc)
                    obs = next_obs
                    t1 = time.perf_counter()
                    self.timing["env_s"] += t1 - t0
                    if self.env_steps >= cfg.learning_starts:
                        if t_learn0 is None:
                            t_learn0, steps_learn0 = t0, self.env_steps - 1
                        metrics = self.agent.update(self._batch(), sync_metrics=False)
                        self.updates += 1
                        self.timing["update_s"] += time.perf_counter() - t1
                    if self.env_steps % cfg.log_every == 0:
                        row = {"env_steps": self.env_steps, "updates": self.updates,
                               "episodes": self.episodes,
                               "train_return_last10": float(np.mean(self.train_returns[-10:]))
                               if self.train_returns else None,
                               **{k: float(v) for k, v in metrics.items()}}
                        progress_f.write(json.dumps(row) + "\n")
                        progress_f.flush()
                        bar.update(self.env_steps - bar.n)
                    if self.env_steps % cfg.eval_every == 0 or (self.env_steps == cfg.steps and cfg.final_eval):
                        self.wall_s = wall0 + time.perf_counter() - t_start
                        entry = self._evaluate_checkpoint()
                        bar.set_postfix(det=f"{entry['return_mean']:.0f}",
                                        sampled=f"{entry['stochastic_return_mean']:.0f}")
                        if self.log is not None:
                            self.log(f"{entry['name']}  return {entry['return_mean']:8.1f} (det)  "
                                     f"{entry['stochastic_return_mean']:8.1f} (sampled)  normalized "
                                     f"{entry['stochastic_normalized_score']:6.1f}  updates {self.updates}  "
                                     f"{self.wall_s:7.0f}s")
                if done:
                    self.train_returns.append(ep_ret)
                    self.episodes += 1
                # An episode cut by the step budget continues on resume with more steps? No: the next
                # sitting starts a new episode, so a budget stop mid-episode ends that episode there
                # (a timeout row, as D4RL marks a cut episode).
                elif self.env_steps >= cfg.steps and self.size:
                    self.buf["timeout"][(self.ptr - 1) % cfg.buffer_capacity] = True
                    self.episodes += 1
        finally:
            bar.close()
            progress_f.close()
            env.close()
            for s, h in old.items():
                signal.signal(s, h)
        self.wall_s = wall0 + time.perf_counter() - t_start
        if t_learn0 is not None:  # end-to-end speed once updates run: env step + action + update + logging
            self.timing["learning_wall_s"] = time.perf_counter() - t_learn0 - self.timing["eval_s"]
            self.timing["learning_steps"] = self.env_steps - steps_learn0
        self.save_state()
        complete = self.env_steps >= cfg.steps
        if stopped:
            self.index["stopped_early"] = f"{stopped} after {self.env_steps} env steps (resumable)"
        else:
            self.index.pop("stopped_early", None)
        self.index.update(complete=complete, env_steps=self.env_steps, wall_s=round(self.wall_s, 1),
                          episodes=self.episodes, updates=self.updates)
        self.write_replay_log()
        _write_json(self.out / "index.json", self.index)
        return self.index

    # ------------------------------------------------------------------------------------------------------
    def replay_dataset(self) -> OfflineDataset:
        """Every transition of the run so far, in order (requires the run to fit the buffer)."""
        if self.env_steps > self.cfg.buffer_capacity:
            raise ValueError("the replay buffer has wrapped: the early transitions are gone")
        n = self.size
        b = {k: v[:n].numpy().copy() for k, v in self.buf.items()}
        done = b["done"] > 0.5
        ends = done | b["timeout"]
        starts = np.zeros(n, bool)
        if n:
            starts[0] = True
            starts[1:] = ends[:-1]
        return OfflineDataset(observations=b["obs"], actions=b["act"], rewards=b["rew"],
                              next_observations=b["next_obs"], terminals=done, timeouts=b["timeout"],
                              episode_starts=starts, env_id=self.spec.key, source=f"sac_replay:{self.out}",
                              metadata={"env_model": self.spec.model, "seed": self.cfg.seed})

    def write_replay_log(self) -> Path | None:
        from dromo_ray.data.d4rl_io import write_d4rl

        if self.env_steps > self.cfg.buffer_capacity or self.size == 0:
            return None
        path = self.out / "replay.hdf5"
        write_d4rl(self.replay_dataset(), path, metadata={
            "kind": "sac_replay_log", "env_key": self.spec.key, "env_id": self.spec.gym_id,
            "env_model": self.spec.model, "seed": self.cfg.seed, "rows": self.size,
            "algorithm": "dromo_ray_sac"})
        return path


# ---------------------------------------------------------------------------------------------------------
# Evaluation and replay


def evaluate_policy_file(path: str | os.PathLike, env: str, episodes: int, seed: int,
                         max_episode_steps: int = 1000) -> dict[str, float]:
    """Deterministic and sampled returns of a policy file in the real environment."""
    out: dict[str, float] = {}
    for mode, deterministic in (("", True), ("stochastic_", False)):
        policy = load_policy(path, deterministic=deterministic, seed=seed)
        res = evaluate_policy(policy, env, episodes=episodes, seed=seed, max_episode_steps=max_episode_steps)
        out[f"{mode}return_mean"] = float(res.mean_return)
        out[f"{mode}return_std"] = float(np.std(res.returns))
        out[f"{mode}normalized_score"] = float(res.mean_normalized)
        out[f"{mode}episode_length_mean"] = float(np.mean(res.lengths))
    return out


def replay_actions(env_key: str, actions: np.ndarray, seed: int, ends: np.ndarray | None = None,
                   max_episode_steps: int = 1000, source: str = "") -> OfflineDataset:
    """Re-run a training run's actions (N, D_a) in the real environment: episode k reset with
    ``episode_seed(seed, k)``, a new episode after each row listed in ``ends`` (the run's episode ends, cut
    ones included; default: after each terminal or time limit), the last episode cut (a timeout row) where
    the actions end. MuJoCo is deterministic, so this reproduces the run's transitions bitwise on the same
    MuJoCo build. ``infos`` holds qpos/qvel of every observation and next observation."""
    spec = env_spec(env_key)
    actions = np.asarray(actions, dtype=np.float32)
    n = actions.shape[0]
    if actions.ndim != 2 or actions.shape[1] != spec.act_dim:
        raise ValueError(f"actions must have shape (N, {spec.act_dim}), got {actions.shape}")
    env = make_env(spec.key, max_episode_steps=max_episode_steps)
    data = env.unwrapped.data  # type: ignore[attr-defined]
    nq, nv = data.qpos.shape[0], data.qvel.shape[0]
    obs_b = np.empty((n, spec.obs_dim), np.float32)
    next_b = np.empty((n, spec.obs_dim), np.float32)
    rew_b = np.empty(n, np.float32)
    term_b = np.zeros(n, bool)
    trunc_b = np.zeros(n, bool)
    start_b = np.zeros(n, bool)
    qpos, qvel = np.empty((n, nq)), np.empty((n, nv))
    nqpos, nqvel = np.empty((n, nq)), np.empty((n, nv))
    forced = np.zeros(n, bool)
    if ends is not None:
        forced[np.asarray(ends, dtype=np.int64)[np.asarray(ends) < n]] = True
    episode, new = 0, True
    obs = None
    try:
        for i in range(n):
            if new:
                obs, _ = env.reset(seed=episode_seed(seed, episode))
                start_b[i] = True
            qpos[i], qvel[i] = data.qpos, data.qvel
            next_obs, rew, term, trunc, _ = env.step(actions[i])
            obs_b[i], rew_b[i], next_b[i] = obs, rew, next_obs
            nqpos[i], nqvel[i] = data.qpos, data.qvel
            term_b[i], trunc_b[i] = term, (trunc or forced[i]) and not term
            new = bool(term or trunc or forced[i])
            episode += new
            obs = next_obs
    finally:
        env.close()
    if n and not (term_b[-1] or trunc_b[-1]):
        trunc_b[-1] = True
    return OfflineDataset(observations=obs_b, actions=actions.copy(), rewards=rew_b, next_observations=next_b,
                          terminals=term_b, timeouts=trunc_b, episode_starts=start_b, env_id=spec.key,
                          source=source or f"replay_actions:{spec.key}", metadata={"env_model": spec.model},
                          infos={"qpos": qpos, "qvel": qvel, "next_qpos": nqpos, "next_qvel": nqvel})


def save_replay_actions(path: str | os.PathLike, env_key: str, actions: np.ndarray, seed: int,
                        meta: dict[str, Any] | None = None) -> Path:
    """The compact replay log: actions (N, D_a) float32 and the seed, compressed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp.npz") as tmp:  # (np.savez adds .npz to other names)
        np.savez_compressed(tmp, actions=np.asarray(actions, np.float32),
                            meta=np.array(json.dumps({"format": ACTIONS_FORMAT, "env": env_key, "seed": int(seed),
                                                      **(meta or {})})))
    return path


def load_replay_actions(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            actions, meta = z["actions"], json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(str(path), f"not a replay-actions file ({e})") from None
    if meta.get("format") != ACTIONS_FORMAT:
        raise DatasetError(str(path), f"not a replay-actions file (format {ACTIONS_FORMAT})", "format")
    return actions, meta
