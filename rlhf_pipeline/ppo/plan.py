"""Batch sizes of a PPO run, derived once from the numbers a recipe states. Imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_pipeline.errors import KeyedValueError, RecipeError


@dataclass(frozen=True)
class BatchPlan:
    """Every batch size of a PPO run, derived from the five numbers a recipe states.

    An update samples `rollout_batch_size` episodes (all processes together), then runs `ppo_epochs` passes over
    them, each pass split into `num_mini_batches` mini-batches; each mini-batch is one optimizer step, computed in
    `gradient_accumulation_steps` micro-batches per process. Hence exactly
    `ppo_epochs * num_mini_batches` optimizer steps per update, whatever the accumulation.
    """

    total_episodes: int
    rollout_batch_size: int
    num_mini_batches: int
    ppo_epochs: int
    gradient_accumulation_steps: int
    num_processes: int = 1
    samples_per_prompt: int = 1  # k responses to each prompt, sampled together in one process

    @classmethod
    def of(cls, training, num_processes: int = 1, samples_per_prompt: int = 1) -> BatchPlan:
        """The plan of a recipe's `training:` section (anything with the five fields), on `num_processes`, with
        `samples_per_prompt` (generation.samples_per_prompt) responses per prompt."""
        return cls(training.total_episodes, training.rollout_batch_size, training.num_mini_batches,
                   training.ppo_epochs, training.gradient_accumulation_steps, num_processes, samples_per_prompt)

    def __post_init__(self):
        # each problem names the key to change and the nearest values that fit, so the fix needs no arithmetic
        problems = [p for p in (self._episodes_problem(), self._split_problem()) if p]
        if not problems and self.local_rollout_batch_size % self.samples_per_prompt:
            problems.append(self._groups_problem())
        if problems:
            raise KeyedValueError(problems)

    def _episodes_problem(self) -> tuple[str, str] | None:
        if self.total_episodes % self.rollout_batch_size == 0:
            return None
        options = " or ".join(f"{n} ({_count(n // self.rollout_batch_size, 'update')})"
                              for n in nearest_multiples(self.total_episodes, self.rollout_batch_size))
        return "total_episodes", (f"{self.total_episodes} must be a multiple of rollout_batch_size "
                                  f"({self.rollout_batch_size}, the episodes of one update); the nearest that are: "
                                  f"{options}")

    def _split_problem(self) -> tuple[str, str] | None:
        split = self.num_processes * self.num_mini_batches * self.gradient_accumulation_steps
        if self.rollout_batch_size % split == 0:
            return None
        groups = ("" if self._rollout_unit == split else
                  f" (and keep whole groups of samples_per_prompt {self.samples_per_prompt} in each process)")
        return "rollout_batch_size", (
            f"{self.rollout_batch_size} must be divisible by processes ({self.num_processes}) x num_mini_batches "
            f"({self.num_mini_batches}) x gradient_accumulation_steps ({self.gradient_accumulation_steps}) = {split} "
            f"(equal micro-batches); the nearest values that are{groups}: {self._rollout_options}")

    def _groups_problem(self) -> tuple[str, str]:
        local, k = self.local_rollout_batch_size, self.samples_per_prompt
        divisors = [d for d in range(2, local + 1) if local % d == 0]  # groups of 2 or more: rloo and grpo need them
        fits = [d for d in (max((d for d in divisors if d < k), default=0), min((d for d in divisors if d > k),
                                                                                  default=0)) if d]
        return "samples_per_prompt", (
            f"each process's share of rollout_batch_size ({self.rollout_batch_size} / {self.num_processes} process(es) "
            f"= {local}) must be a multiple of samples_per_prompt ({k}): a prompt's responses are sampled and compared "
            "in one process; " + (f"samples_per_prompt {' or '.join(map(str, fits))} fits, or " if fits else "")
            + f"rollout_batch_size {self._rollout_options}")

    @property
    def _rollout_unit(self) -> int:
        """What rollout_batch_size must be a multiple of: equal micro-batches, whole groups of k in each process."""
        split = self.num_processes * self.num_mini_batches * self.gradient_accumulation_steps
        return math.lcm(split, self.num_processes * self.samples_per_prompt)

    @property
    def _rollout_options(self) -> str:
        return " or ".join(map(str, nearest_multiples(self.rollout_batch_size, self._rollout_unit)))

    @property
    def num_updates(self) -> int:
        return self.total_episodes // self.rollout_batch_size

    @property
    def local_rollout_batch_size(self) -> int:
        return self.rollout_batch_size // self.num_processes

    @property
    def prompts_per_update(self) -> int:
        """Distinct prompts in one update, all processes together."""
        return self.rollout_batch_size // self.samples_per_prompt

    @property
    def local_prompts_per_update(self) -> int:
        return self.local_rollout_batch_size // self.samples_per_prompt

    @property
    def mini_batch_size(self) -> int:
        """Episodes per optimizer step, all processes together."""
        return self.rollout_batch_size // self.num_mini_batches

    @property
    def local_mini_batch_size(self) -> int:
        return self.mini_batch_size // self.num_processes

    @property
    def micro_batch_size(self) -> int:
        """Episodes per forward/backward pass on one process."""
        return self.local_mini_batch_size // self.gradient_accumulation_steps

    @property
    def optimizer_steps_per_update(self) -> int:
        return self.ppo_epochs * self.num_mini_batches

    @property
    def total_optimizer_steps(self) -> int:
        return self.num_updates * self.optimizer_steps_per_update

    def describe(self, processes_from: str = "") -> str:
        """Every batch size, global and per process: the recipe counts the rollout and its mini-batches over all
        processes together (where TRL's per_device_train_batch_size counts one device). `processes_from` says where
        the process count comes from (e.g. WORLD_SIZE)."""
        groups = (f"{self.prompts_per_update} prompts x {self.samples_per_prompt} responses; "
                  if self.samples_per_prompt > 1 else "")
        g, micro = self.gradient_accumulation_steps, self.micro_batch_size
        micro_batches = "1 micro-batch" if g == 1 else f"{g} accumulated micro-batches of {micro}"
        return (f"{self.rollout_batch_size} episodes per update ({groups}rollout_batch_size, all processes together) = "
                f"{self.local_rollout_batch_size} per process x {_count(self.num_processes, 'process')}"
                f"{f' ({processes_from})' if processes_from else ''}; "
                f"{_count(self.num_updates, 'update')}; each update: {self.ppo_epochs} epochs x "
                f"{self.num_mini_batches} mini-batches of {self.mini_batch_size} episodes "
                f"({self.local_mini_batch_size} per process, in {micro_batches}) = {self.optimizer_steps_per_update} "
                f"optimizer steps; {self.total_optimizer_steps} optimizer steps in all")

def nearest_multiples(value: int, unit: int) -> list[int]:
    """The multiples of `unit` just below and just above `value` (only above when below is 0)."""
    below = value // unit * unit
    return [below, below + unit] if below else [below + unit]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('s') else 's'}"


# The plan's fields are `training:` keys, except this one
RECIPE_KEYS = {"samples_per_prompt": "generation.samples_per_prompt"}


def in_recipe(exc: KeyedValueError) -> KeyedValueError:
    """The plan's problems keyed by the recipe keys to change (for a validator of the whole recipe)."""
    return KeyedValueError((RECIPE_KEYS.get(field, f"training.{field}"), message) for field, message in exc.problems)


def plan_of(loaded, num_processes: int = 1) -> BatchPlan:
    """The batch plan of a loaded PPO recipe on `num_processes`; when they do not divide, a RecipeError pointing at
    each key to change (the recipe validated with 1 process; a launch, a dry run or `rlhf plan` may use more)."""
    recipe = loaded.recipe
    try:
        return BatchPlan.of(recipe.training, num_processes, recipe.generation.samples_per_prompt)
    except KeyedValueError as exc:
        raise RecipeError([loaded.problem(key, f"with {num_processes} process(es): {message}")
                           for key, message in in_recipe(exc).problems]) from None
