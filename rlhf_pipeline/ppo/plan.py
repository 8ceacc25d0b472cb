"""Batch sizes of a PPO run, derived once from the numbers a recipe states. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass


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
        problems = []
        if self.total_episodes % self.rollout_batch_size:
            problems.append(f"total_episodes ({self.total_episodes}) must be a multiple of rollout_batch_size "
                            f"({self.rollout_batch_size})")
        split = self.num_processes * self.num_mini_batches * self.gradient_accumulation_steps
        if self.rollout_batch_size % split:
            problems.append(
                f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by processes ({self.num_processes})"
                f" x num_mini_batches ({self.num_mini_batches}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {split}")
        local = self.rollout_batch_size // self.num_processes
        if not problems and local % self.samples_per_prompt:
            problems.append(f"each process's share of rollout_batch_size ({self.rollout_batch_size} / "
                            f"{self.num_processes} process(es) = {local}) must be a multiple of samples_per_prompt "
                            f"({self.samples_per_prompt}): a prompt's responses are sampled and compared in one "
                            "process")
        if problems:
            raise ValueError("; ".join(problems))

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

    def describe(self) -> str:
        episodes = (f"{self.rollout_batch_size} episodes" if self.samples_per_prompt == 1 else
                    f"{self.rollout_batch_size} episodes ({self.prompts_per_update} prompts x "
                    f"{self.samples_per_prompt} responses)")
        return (f"{self.num_updates} updates x {episodes}; each update: {self.ppo_epochs} "
                f"epochs x {self.num_mini_batches} mini-batches of {self.mini_batch_size} = "
                f"{self.optimizer_steps_per_update} optimizer steps (micro-batch {self.micro_batch_size} per process, "
                f"{self.gradient_accumulation_steps} accumulated, {self.num_processes} process(es)); "
                f"{self.total_optimizer_steps} optimizer steps in all")
