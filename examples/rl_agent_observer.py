"""Reinforcement learning: one agent, several observers, REINFORCE on cart-pole.

The pattern
-----------
The agent (rank 0) owns the policy network; each observer (ranks 1..N) owns an
environment, here the classic cart-pole, written below in a few lines. For
every round of episodes the agent asks all observers at once to play one
episode each; an observer steps its environment and, at every step, asks the
agent which action to take (PyTorch's "RL with RPC" tutorial, ported to
asyncio)::

    # on the agent
    rewards = await asyncio.gather(
        *(observer.rpc_async().run_episode(agent_rref) for observer in observers)
    )

    # on an observer: an async def method, so it runs on the observer's loop
    async def run_episode(self, agent):
        state = self.env.reset()
        while not done:
            action = await agent.rpc_async().select_action(self.id, state)
            state, reward, done = self.env.step(action)

Calls go both ways at once: while the agent awaits the observers' episodes,
its event loop keeps answering their ``select_action`` calls, which run the
policy and keep the log-probabilities of the chosen actions (on the agent,
where the policy lives, so no distributed autograd is needed). When the
episodes are in, the agent applies REINFORCE: each step's log-probability is
weighted by the discounted return that followed it.

The reward is the number of steps the pole stays up (at most ``--max-steps``,
200). A random policy keeps it up for about 20; the running reward (an
exponential average of the rounds' mean rewards) is printed as it rises, and
training stops once it reaches ``--target`` (default 150). The run fails
(exit status 1) if that does not happen within ``--episodes`` rounds.

Run it
------
::

    python examples/rl_agent_observer.py                  # agent + 2 observers, local
    python examples/rl_agent_observer.py --world-size 4 --plot rl.png
    torchrun --nproc-per-node 3 examples/rl_agent_observer.py

The last line printed is ``RESULT {...}`` (JSON) for scripts and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time

import torch
from _plumbing import Progress, launch, save_plot

import aiorpc_autograd as rpc

GAMMA = 0.99  # discount of future rewards


# --------------------------------------------------------------------------- the environment


class CartPole:
    """A pole on a cart; push the cart left (0) or right (1) to keep it upright.

    The dynamics and limits of the classic control problem (Barto, Sutton and
    Anderson 1983; OpenAI Gym's CartPole): the episode ends when the pole leans
    more than 12 degrees or the cart leaves the track. Reward: 1 per step.
    """

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.state = [0.0] * 4

    def reset(self) -> torch.Tensor:
        self.state = [self.rng.uniform(-0.05, 0.05) for _ in range(4)]
        return torch.tensor(self.state)

    def step(self, action: int) -> tuple[torch.Tensor, float, bool]:
        x, x_dot, theta, theta_dot = self.state
        gravity, cart_mass, pole_mass, half_length, dt = 9.8, 1.0, 0.1, 0.5, 0.02
        total_mass = cart_mass + pole_mass
        force = 10.0 if action == 1 else -10.0
        cos, sin = math.cos(theta), math.sin(theta)
        temp = (force + pole_mass * half_length * theta_dot**2 * sin) / total_mass
        theta_acc = (gravity * sin - cos * temp) / (
            half_length * (4 / 3 - pole_mass * cos**2 / total_mass)
        )
        x_acc = temp - pole_mass * half_length * theta_acc * cos / total_mass
        x, x_dot = x + dt * x_dot, x_dot + dt * x_acc
        theta, theta_dot = theta + dt * theta_dot, theta_dot + dt * theta_acc
        self.state = [x, x_dot, theta, theta_dot]
        done = abs(x) > 2.4 or abs(theta) > 12 * math.pi / 180
        return torch.tensor(self.state), 1.0, done


# --------------------------------------------------------------------------- observers


class Observer:
    """Lives on an observer worker (created there by the agent with ``rpc.remote``)."""

    def __init__(self, observer_id: int, seed: int) -> None:
        self.id = observer_id
        self.env = CartPole(seed * 1000 + observer_id)

    async def run_episode(self, agent: rpc.RRef[Agent], max_steps: int) -> list[float]:
        """Play one episode, asking the agent for every action; return the rewards."""
        state = self.env.reset()
        rewards: list[float] = []
        for _ in range(max_steps):
            action = await agent.rpc_async().select_action(self.id, state)
            state, reward, done = self.env.step(action)
            rewards.append(reward)
            if done:
                break
        return rewards


# --------------------------------------------------------------------------- the agent (rank 0)


class Agent:
    """Lives on rank 0: the policy, its optimizer, and RRefs to the observers."""

    def __init__(self, world_size: int, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.policy = torch.nn.Sequential(
            torch.nn.Linear(4, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2)
        )
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=args.lr)
        self.max_steps = args.max_steps
        self.rref = rpc.RRef(self)  # what the observers call back
        ranks = range(1, world_size)
        self.observers = [rpc.remote(rank, Observer, (rank, args.seed)) for rank in ranks]
        # One random generator per observer: the runs repeat exactly, in
        # whatever order the observers' calls arrive.
        self.generators = {rank: torch.Generator().manual_seed(args.seed + rank) for rank in ranks}
        self.log_probs: dict[int, list[torch.Tensor]] = {rank: [] for rank in ranks}

    def select_action(self, observer_id: int, state: torch.Tensor) -> int:
        """Called by the observers, once per step (a plain method: it runs in
        the agent's thread pool)."""
        probs = torch.softmax(self.policy(state), dim=-1)
        action = torch.multinomial(probs, 1, generator=self.generators[observer_id])
        self.log_probs[observer_id].append(probs[action].log())
        return int(action.item())

    async def run_episodes(self) -> list[float]:
        """One round: every observer plays an episode, then one REINFORCE update.
        Returns each observer's total reward."""
        episodes = await asyncio.gather(
            *(ob.rpc_async().run_episode(self.rref, self.max_steps) for ob in self.observers)
        )
        log_probs, returns = [], []
        for rewards, observer_id in zip(episodes, self.log_probs, strict=True):
            future = 0.0
            discounted = []
            for reward in reversed(rewards):
                future = reward + GAMMA * future
                discounted.append(future)
            returns += reversed(discounted)
            log_probs += self.log_probs[observer_id]
            self.log_probs[observer_id] = []
        weights = torch.tensor(returns)
        weights = (weights - weights.mean()) / (weights.std() + 1e-8)
        loss = -(torch.cat(log_probs) * weights).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return [sum(rewards) for rewards in episodes]


async def train(world_size: int, args: argparse.Namespace) -> int:
    agent = Agent(world_size, args)
    print(
        f"agent + {world_size - 1} observers, cart-pole, episodes of at most {args.max_steps} "
        f"steps; target running reward {args.target:g} within {args.episodes} rounds"
    )
    mean_rewards: list[float] = []
    running_rewards: list[float] = []
    running = 0.0
    bar = Progress(args.episodes, "round ")
    started = time.perf_counter()
    for episode in range(1, args.episodes + 1):
        rewards = await agent.run_episodes()
        mean = sum(rewards) / len(rewards)
        running = mean if episode == 1 else 0.9 * running + 0.1 * mean
        mean_rewards.append(mean)
        running_rewards.append(running)
        bar.update(episode, f"running reward {running:.1f}")
        solved = running >= args.target
        if episode % args.log_every == 0 or solved or episode == args.episodes:
            bar.print(
                f"round {episode:3d}  rewards {' '.join(f'{r:3.0f}' for r in rewards)}"
                f"  running reward {running:6.1f}  ({time.perf_counter() - started:.1f} s)"
            )
        if solved:
            break
    seconds = time.perf_counter() - started
    print(
        f"{'reached' if solved else 'MISSED'} the target: running reward {running:.1f} "
        f"(target {args.target:g}, first round {mean_rewards[0]:.1f}) after "
        f"{len(mean_rewards)} rounds, {seconds:.1f} s"
    )
    if args.plot:
        curves = {"reward": {"round mean": mean_rewards, "running": running_rewards}}
        save_plot(args.plot, curves, "round")
    result = {
        "reward_first": mean_rewards[0],
        "running_reward": running,
        "rounds": len(mean_rewards),
        "target": args.target,
        "solved": solved,
        "seconds": round(seconds, 3),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if solved else 1


async def run_worker(rank: int, world_size: int, init_method: str, args: argparse.Namespace) -> int:
    """Everything one process does: rank 0 is the agent, the others observe."""
    if world_size < 2:
        raise SystemExit("the agent needs at least one observer: --world-size >= 2")
    torch.set_num_threads(1)
    name = "agent" if rank == 0 else f"observer{rank}"
    options = rpc.RpcOptions(rpc_timeout=120)
    if rank == 0:
        async with rpc.worker(name, rank, world_size, init_method=init_method, options=options):
            return await train(world_size, args)
    # An observer only answers the agent's requests. shutdown() keeps serving
    # until every worker has called it, that is until the agent is done.
    async with rpc.worker(
        name, rank, world_size, init_method=init_method, options=options, shutdown_timeout=0
    ):
        pass
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200, help="rounds of episodes, at most")
    parser.add_argument("--world-size", type=int, default=3, help="1 agent + N observers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=200, help="steps per episode, at most")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--target", type=float, default=150.0, help="running reward to reach")
    parser.add_argument("--log-every", type=int, default=5, help="rounds between log lines")
    parser.add_argument("--plot", metavar="PATH", help="write the reward curves to this PNG")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(launch(run_worker, parse_args()))
