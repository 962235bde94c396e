"""A virtual robot: a kinema task simulated in its own process at wall-clock rate, driven over loopback.

The stand-in for hardware in tests, demos and benchmarks, and the worked example of
:class:`kinema.sim2real.robot.Robot`. The controller side (:class:`VirtualRobot`) binds three ZeroMQ
sockets on 127.0.0.1 and starts the simulation process, which connects to them:

- observations: PUB (robot) -> SUB (controller) with ``CONFLATE``, so the controller always reads the
  newest observation and a slow reader never builds a backlog;
- actions: PUSH (controller) -> PULL (robot), sent without blocking; the robot applies the newest
  action it holds when its step is due, and holds the previous one when none came (counted);
- commands: REQ -> REP with a timeout on every request (``spec``, ``reset``, ``estop``, ``shutdown``).

Why ZeroMQ (pyzmq) over shared memory: the same sockets and messages work across machines, which is
how a real robot's driver is usually reached; every send and receive has a timeout (deoxys drives its
arms the same way); and a dead peer shows as silence, never as a torn read of shared memory. The
price is a loopback round trip of tens of microseconds, measured in ``benchmarks/control_loop.py``.

The simulation steps on a fixed grid of wall-clock times (the task's ``env.dt``, or ``rate_hz`` with the
MuJoCo frame skip set to match): it publishes each observation with its timestamp (``time.monotonic``,
a clock the controller on the same host shares), its reward and the episode flags. Episodes start on
``start_episode`` at the next grid point, so the controller's schedule stays aligned; after an
episode ends the robot stands still until the next ``start_episode``. Faults can be injected:
Gaussian sensor noise, observation and action latency, and packet loss in both directions, all
seeded; and a domain-randomisation profile (``randomization``) varies the dynamics per episode. An e-stop zeroes the actuators until the next episode. The process exits when its parent does.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np

from kinema.sim2real.robot import Robot, RobotError, RobotObservation, RobotSpec

log = logging.getLogger(__name__)

LOOPBACK = "tcp://127.0.0.1"
# observation message: sequence, timestamp, reward (NaN: none), flags, then float64 values
OBSERVATION_HEADER = struct.Struct("<qddB")
ACTION_HEADER = struct.Struct("<q")
TERMINATED, TRUNCATED = 1, 2
COMMAND_TIMEOUT_S = 1.0
START_TIMEOUT_S = 60.0  # importing MuJoCo and building the model in a fresh process
SPIN_S = 0.001  # the last stretch before a step is spun, not slept: sleeps overshoot by up to a millisecond


def require_zmq() -> Any:
    try:
        import zmq
    except ImportError:
        raise ImportError("the virtual robot needs pyzmq: pip install 'kinema[deploy]'") from None
    return zmq


@dataclass
class VirtualRobotConfig:
    """The simulated robot and its injected faults (``virtual.*`` in kinema-deploy's config)."""

    task: Optional[str] = None  # a kinema task or Gymnasium MuJoCo id (kinema-deploy: null means the checkpoint's)
    rate_hz: Optional[float] = None  # None: the task's own control rate, 1 / env.dt
    observation_noise_std: float = 0.0
    observation_latency_s: float = 0.0
    action_latency_s: float = 0.0
    packet_loss: float = 0.0  # probability that an observation or an action message is lost
    randomization: Optional[str] = None  # a domain-randomisation profile (kinema.envs.randomization), drawn per episode
    randomization_file: Optional[str] = None  # a YAML file of profiles of your own
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("observation_noise_std", "observation_latency_s", "action_latency_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
                raise ValueError(f"virtual.{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.packet_loss, (int, float)) and 0 <= self.packet_loss < 1):
            raise ValueError(f"virtual.packet_loss must be in [0, 1), got {self.packet_loss!r}")
        if self.rate_hz is not None and not (isinstance(self.rate_hz, (int, float)) and self.rate_hz > 0):
            raise ValueError(f"virtual.rate_hz must be a positive number or null, got {self.rate_hz!r}")


def frame_skip_for(task: str, rate_hz: float | None) -> int | None:
    """The MuJoCo frame skip that makes the task step at ``rate_hz`` (None: the task's own)."""
    if rate_hz is None:
        return None
    from kinema.envs.registry import make_env

    env = make_env(task)
    timestep = float(env.unwrapped.model.opt.timestep)
    env.close()
    frames = 1.0 / (rate_hz * timestep)
    if frames < 1 - 1e-9 or abs(frames - round(frames)) > 1e-6:
        raise ValueError(f"rate_hz={rate_hz:g}: the {task!r} simulation's timestep is {timestep * 1e3:g} ms, so its rate must be "
                         f"1 / (k x {timestep * 1e3:g} ms) for a whole frame skip k >= 1 (e.g. {1 / timestep:g}, {1 / (2 * timestep):g})")
    return int(round(frames))


def build_simulation(config: VirtualRobotConfig) -> tuple[Any, RobotSpec]:
    """The task's environment as ``config`` sets it up (rate, randomisation), and the robot spec it offers."""
    from kinema.envs.joints import actuated_joint_limits
    from kinema.envs.registry import get_task, make_env
    from kinema.sim2real.robot import JointLimit

    frame_skip = frame_skip_for(config.task, config.rate_hz)
    profile = None
    if config.randomization:
        from kinema.envs.randomization import get_profile

        profile = get_profile(config.randomization, config.randomization_file)
    env = make_env(config.task, randomization=profile, **({} if frame_skip is None else {"frame_skip": frame_skip}))
    env.reset(seed=config.seed)
    space, task = env.action_space, get_task(config.task)
    spec = RobotSpec(
        obs_dim=int(env.observation_space.shape[0]), act_dim=int(space.shape[0]),
        action_low=tuple(float(x) for x in space.low), action_high=tuple(float(x) for x in space.high),
        rate_hz=1.0 / float(env.unwrapped.dt), task=task.name, provides_reward=True, episode_steps=task.max_episode_steps,
        joint_limits=tuple(JointLimit(**limit) for limit in actuated_joint_limits(env)))
    return env, spec


# -- the simulation process -----------------------------------------------------------------------
class _Simulation:
    """Runs in the robot process: the environment, the step grid, the fault injection."""

    def __init__(self, config: VirtualRobotConfig, endpoints: dict[str, str], parent_pid: int):
        zmq = require_zmq()
        self.zmq, self.config, self.parent_pid = zmq, config, parent_pid
        self.env, self.spec = build_simulation(config)
        self.period = 1.0 / self.spec.rate_hz
        self.context = zmq.Context()
        self.observations = self.context.socket(zmq.PUB)
        self.actions = self.context.socket(zmq.PULL)
        self.commands = self.context.socket(zmq.REP)
        for socket, name in ((self.observations, "observations"), (self.actions, "actions"), (self.commands, "commands")):
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(endpoints[name])
        self.random = np.random.default_rng(config.seed)
        self.sequence = -1
        self.running = False
        self.reset_seed: int | None = None
        self.grid_start: float | None = None
        self.next_step = 0.0
        self.action = np.zeros(self.spec.act_dim)
        self.action_for = -1
        self.estopped = False
        self.outgoing: deque[tuple[float, bytes]] = deque()
        self.incoming: deque[tuple[float, int, np.ndarray]] = deque()
        self.counts = {"steps": 0, "held_actions": 0, "lost_observations": 0, "lost_actions": 0, "overruns": 0}

    def serve(self) -> None:
        poller = self.zmq.Poller()
        poller.register(self.commands, self.zmq.POLLIN)
        poller.register(self.actions, self.zmq.POLLIN)
        while True:
            now = time.monotonic()
            due = [self.next_step] if self.running or self.reset_seed is not None else [now + 0.1]
            due += [self.outgoing[0][0]] if self.outgoing else []
            due += [self.incoming[0][0]] if self.incoming else []
            wait = min(due) - now
            events = dict(poller.poll(timeout=int((wait - SPIN_S) * 1e3) if wait > SPIN_S else 0))
            if self.commands in events and not self._command():
                return
            if self.actions in events:
                self._receive_actions()
            if min(due) - time.monotonic() > SPIN_S:
                continue
            while time.monotonic() < min(due):  # the last stretch: spin, since sleeps overshoot
                pass
            now = time.monotonic()
            self._deliver(now)
            if self.reset_seed is not None and now >= self.next_step:
                self._start_episode(now)
            elif self.running and now >= self.next_step:
                self._step(now)
            if os.getppid() != self.parent_pid:  # the controller's process is gone
                return

    def _command(self) -> bool:
        request = json.loads(self.commands.recv())
        command = request.get("command")
        reply: dict[str, Any] = {"ok": True}
        if command == "spec":
            reply["spec"] = self.spec.to_dict()
        elif command == "reset":
            self.reset_seed = int(request.get("seed", 0))
            now = time.monotonic()
            if self.grid_start is None:
                self.grid_start = now
            steps = int(np.ceil((now - self.grid_start) / self.period + 1e-9))
            self.next_step = self.grid_start + steps * self.period  # the next point of the controller's grid
        elif command == "estop":
            self.estopped = True
        elif command == "counts":
            reply["counts"] = dict(self.counts)
        elif command == "shutdown":
            reply["counts"] = dict(self.counts)
            self.commands.send(json.dumps(reply).encode())
            return False
        else:
            reply = {"ok": False, "error": f"unknown command {command!r}"}
        self.commands.send(json.dumps(reply).encode())
        return True

    def _receive_actions(self) -> None:
        while True:
            try:
                message = self.actions.recv(self.zmq.NOBLOCK)
            except self.zmq.Again:
                return
            if self.config.packet_loss and self.random.random() < self.config.packet_loss:
                self.counts["lost_actions"] += 1
                continue
            (sequence,) = ACTION_HEADER.unpack_from(message)
            action = np.frombuffer(message, dtype=np.float64, offset=ACTION_HEADER.size)
            self.incoming.append((time.monotonic() + self.config.action_latency_s, sequence, action.copy()))

    def _deliver(self, now: float) -> None:
        while self.incoming and self.incoming[0][0] <= now:
            _, self.action_for, self.action = self.incoming.popleft()
        while self.outgoing and self.outgoing[0][0] <= now:
            self.observations.send(self.outgoing.popleft()[1])

    def _publish(self, values: np.ndarray, now: float, reward: float | None, flags: int) -> None:
        if self.config.packet_loss and self.random.random() < self.config.packet_loss:
            self.counts["lost_observations"] += 1
            return
        if self.config.observation_noise_std:
            values = values + self.random.normal(0.0, self.config.observation_noise_std, size=values.shape)
        message = OBSERVATION_HEADER.pack(self.sequence, now, np.nan if reward is None else reward, flags)
        self.outgoing.append((now + self.config.observation_latency_s, message + np.asarray(values, np.float64).tobytes()))
        self._deliver(time.monotonic())

    def _start_episode(self, now: float) -> None:
        observation, _ = self.env.reset(seed=self.reset_seed)
        self.reset_seed, self.running, self.estopped = None, True, False
        self.action, self.action_for = np.zeros(self.spec.act_dim), -1
        self.sequence += 1
        self.next_step += self.period
        self._publish(observation, now, None, 0)

    def _step(self, now: float) -> None:
        if self.action_for != self.sequence:
            self.counts["held_actions"] += 1  # no action computed from the current observation arrived in time
        action = np.zeros(self.spec.act_dim) if self.estopped else self.action
        observation, reward, terminated, truncated, _ = self.env.step(action)
        self.counts["steps"] += 1
        self.sequence += 1
        self.next_step += self.period
        if now - self.next_step > self.period:  # fell behind (the machine was busy): keep the grid, skip the missed points
            self.counts["overruns"] += 1
            self.next_step += np.floor((now - self.next_step) / self.period) * self.period + self.period
        self.running = not (terminated or truncated)
        flags = (TERMINATED if terminated else 0) | (TRUNCATED if truncated else 0)
        self._publish(observation, now, float(reward), flags)


def main(argv: list[str] | None = None) -> None:
    """The robot process: ``python -m kinema.sim2real.virtual_robot '<json: config, endpoints, parent_pid>'``."""
    import sys

    arguments = json.loads((argv if argv is not None else sys.argv[1:])[0])
    logging.basicConfig(level=logging.WARNING)
    simulation = _Simulation(VirtualRobotConfig(**arguments["config"]), arguments["endpoints"], arguments["parent_pid"])
    simulation.serve()


# -- the controller's side ------------------------------------------------------------------------------
class VirtualRobot(Robot):
    """The controller's handle on a simulated robot process; see the module docstring."""

    def __init__(self, config: VirtualRobotConfig):
        if not config.task:
            raise ValueError("the virtual robot needs a task: VirtualRobotConfig(task='hopper')")
        self.config = config
        self.process: subprocess.Popen | None = None
        self.context = None
        self.last_sequence = -1
        self.spec = None  # type: ignore[assignment]
        self.counts: dict[str, int] = {}

    def connect(self) -> None:
        zmq = require_zmq()
        self.zmq = zmq
        frame_skip_for(self.config.task, self.config.rate_hz)  # a rate the simulation cannot run is refused here
        if self.config.randomization:  # and an unknown profile
            from kinema.envs.randomization import get_profile

            get_profile(self.config.randomization, self.config.randomization_file)
        self.context = zmq.Context()
        self.observations = self.context.socket(zmq.SUB)
        self.observations.setsockopt(zmq.CONFLATE, 1)
        self.observations.setsockopt(zmq.SUBSCRIBE, b"")
        self.actions = self.context.socket(zmq.PUSH)
        self.actions.setsockopt(zmq.SNDHWM, 4)
        self.commands = self._command_socket()
        endpoints = {}
        for socket, name in ((self.observations, "observations"), (self.actions, "actions"), (self.commands, "commands")):
            socket.setsockopt(zmq.LINGER, 0)
            port = socket.bind_to_random_port(LOOPBACK)
            endpoints[name] = f"{LOOPBACK}:{port}"
        self.endpoints = endpoints
        # a fresh interpreter, not a fork (the controller holds threads a fork would copy half-alive) and not
        # multiprocessing's spawn (which re-imports the caller's main module: scripts without a main guard break)
        arguments = json.dumps({"config": asdict(self.config), "endpoints": endpoints, "parent_pid": os.getpid()})
        self.process = subprocess.Popen([sys.executable, "-m", "kinema.sim2real.virtual_robot", arguments])
        self.spec = RobotSpec.from_dict(self._request({"command": "spec"}, timeout_s=START_TIMEOUT_S)["spec"])

    def _command_socket(self) -> Any:
        socket = self.context.socket(self.zmq.REQ)
        socket.setsockopt(self.zmq.REQ_RELAXED, 1)  # a timed-out request does not wedge the socket
        socket.setsockopt(self.zmq.REQ_CORRELATE, 1)
        return socket

    def _check_alive(self) -> None:
        if self.process is None:
            raise RobotError("the virtual robot is not connected")
        if self.process.poll() is not None:
            raise RobotError(f"the virtual robot's process exited (code {self.process.returncode})")

    def _request(self, request: dict[str, Any], timeout_s: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        self._check_alive()
        self.commands.send(json.dumps(request).encode())
        deadline = time.monotonic() + timeout_s
        while not self.commands.poll(timeout=100):
            self._check_alive()
            if time.monotonic() > deadline:
                raise RobotError(f"the virtual robot did not answer {request['command']!r} within {timeout_s:g} s")
        reply = json.loads(self.commands.recv())
        if not reply.get("ok"):
            raise RobotError(f"the virtual robot refused {request['command']!r}: {reply.get('error')}")
        return reply

    def get_observation(self, timeout_s: float) -> RobotObservation | None:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if self.observations.poll(timeout=max(0.0, min(remaining, 0.1)) * 1e3):
                message = self.observations.recv()
                sequence, timestamp, reward, flags = OBSERVATION_HEADER.unpack_from(message)
                if sequence > self.last_sequence:
                    self.last_sequence = sequence
                    values = np.frombuffer(message, dtype=np.float64, offset=OBSERVATION_HEADER.size).copy()
                    return RobotObservation(values, timestamp, sequence, None if np.isnan(reward) else reward,
                                            terminated=bool(flags & TERMINATED), truncated=bool(flags & TRUNCATED))
            elif remaining <= 0:
                self._check_alive()
                return None

    def send_action(self, action: np.ndarray, sequence: int) -> None:
        message = ACTION_HEADER.pack(sequence) + np.asarray(action, dtype=np.float64).tobytes()
        try:
            self.actions.send(message, self.zmq.NOBLOCK)
        except self.zmq.Again:  # the robot is not reading: the watchdog and robot_lost will tell
            self._check_alive()

    def estop(self) -> None:
        self._request({"command": "estop"})

    def start_episode(self, seed: int | None = None) -> None:
        self._request({"command": "reset", "seed": 0 if seed is None else int(seed)})

    def robot_counts(self) -> dict[str, int]:
        """What the simulation counted: steps, held actions, lost messages, its own overruns."""
        return self._request({"command": "counts"})["counts"]

    def disconnect(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                self.counts = self._request({"command": "shutdown"})["counts"]
        except RobotError as exc:
            log.warning("virtual robot: %s", exc)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None
        self.context.destroy(linger=0)
        self.context = None


if __name__ == "__main__":
    main()
