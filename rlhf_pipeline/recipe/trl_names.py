"""The names TRL, transformers and peft users write, and where each goes in our recipes.

One table, read by the unknown-key error ("did you mean 'peft.alpha'?") and by the `training:` check of the
TRL-backed stages (a TRL config field that a recipe sets elsewhere, such as `push_to_hub`, is refused there with a
pointer). Pure data: importing it imports nothing.

Sources of the names: TRL's SFTConfig, RewardConfig, DPOConfig, GRPOConfig and RLOOConfig, its ModelConfig and
ScriptArguments (the flat `trl sft --config` files), the PPOConfig of TRL before 1.0 (whose batch arithmetic our
`rlhf ppo` replaces), transformers.TrainingArguments and peft.LoraConfig.
"""

from __future__ import annotations

from dataclasses import dataclass

ANY = "*"  # every stage that has the target key (the lookup checks that it exists)


@dataclass(frozen=True)
class Alias:
    key: str | None  # our dotted key (or section); None: there is no such setting
    note: str = ""  # how its meaning or value differs, when it does


_PER_DEVICE_PPO = ("TRL counts per device; rollout_batch_size counts all processes together: per_device_train_batch_"
                   "size x gradient_accumulation_steps x num_mini_batches x processes")
_TRUNCATION = "TRL 1.x cuts prompt and response together at max_length (see truncation_mode)"
_LENGTH_IN_EPISODES = "PPO's length is counted in episodes: updates = total_episodes / rollout_batch_size"

# name -> {stage or ANY: where it goes}. A stage's own entry wins over ANY.
TRL_NAMES: dict[str, dict[str, Alias]] = {
    # set once per recipe, outside `training:`
    "output_dir": {ANY: Alias("output_dir", "at the top level; --output-dir overrides it")},
    "seed": {ANY: Alias("seed", "at the top level")},
    "hub_token": {ANY: Alias(None, "tokens never go in recipes: set HF_TOKEN or run `hf auth login`")},
    "push_to_hub": {ANY: Alias("hub.push", "with hub.repo_id")},
    "hub_model_id": {ANY: Alias("hub.repo_id")},
    "hub_private_repo": {ANY: Alias("hub.private")},
    "hub_revision": {ANY: Alias("hub.revision")},
    "pad_token": {ANY: Alias(None, "rlhf pads with the tokenizer's pad token, or its EOS token when it has none")},
    "chat_template_path": {ANY: Alias("tokenizer.chat_template")},
    "dataset_text_field": {ANY: Alias("data.columns.text")},
    # TRL's ModelConfig
    "model_name_or_path": {ANY: Alias("model.name_or_path"), "ppo": Alias("policy.name_or_path"),
                           "eval": Alias("policy.name_or_path")},
    "model_revision": {ANY: Alias("model.revision"), "ppo": Alias("policy.revision")},
    "torch_dtype": {ANY: Alias("model.dtype"), "ppo": Alias("policy.dtype")},
    "trust_remote_code": {ANY: Alias("model.trust_remote_code"), "ppo": Alias("policy.trust_remote_code")},
    "model_init_kwargs": {ANY: Alias("model", "its keys: name_or_path, revision, dtype, attn_implementation"),
                          "ppo": Alias("policy", "its keys: name_or_path, revision, dtype, attn_implementation")},
    "use_peft": {ANY: Alias("peft", "LoRA is on when the recipe has a `peft:` section")},
    "lora_r": {ANY: Alias("peft.r")},
    "rank": {ANY: Alias("peft.r")},
    "lora_alpha": {ANY: Alias("peft.alpha")},
    "lora_dropout": {ANY: Alias("peft.dropout")},
    "lora_target_modules": {ANY: Alias("peft.target_modules")},
    "target_modules": {ANY: Alias("peft.target_modules")},
    # TRL's ScriptArguments
    "dataset_name": {ANY: Alias("data.dataset")},
    "dataset_config": {ANY: Alias("data.subset")},
    "dataset_train_split": {ANY: Alias("data.train_split")},
    "dataset_test_split": {ANY: Alias("data.eval_split")},
    # renamed in TRL / transformers
    "max_seq_length": {ANY: Alias("training.max_length"), "pretrain": Alias("data.block_size")},
    "evaluation_strategy": {ANY: Alias("training.eval_strategy")},
    "mixed_precision": {ANY: Alias("training.bf16", "TRL's flags: `bf16: true` or `fp16: true`")},
    # lengths and sampling
    "max_new_tokens": {ANY: Alias("generation.response_length")},
    "max_completion_length": {ANY: Alias("generation.response_length"), "dpo": Alias("training.max_length",
                                                                                      _TRUNCATION)},
    "max_prompt_length": {ANY: Alias("data.max_prompt_length"), "dpo": Alias("training.max_length", _TRUNCATION)},
    "response_length": {ANY: Alias("generation.response_length")},
    "num_generations": {ANY: Alias("generation.samples_per_prompt")},
    "rloo_k": {ANY: Alias("generation.samples_per_prompt")},
    # PPO / GRPO / RLOO knobs under our names (`rlhf ppo` is our own trainer)
    "bf16": {"ppo": Alias("training.mixed_precision", "`mixed_precision: bf16`: one key for bf16 and fp16")},
    "fp16": {"ppo": Alias("training.mixed_precision", "`mixed_precision: fp16`: one key for bf16 and fp16")},
    "per_device_train_batch_size": {"ppo": Alias("training.rollout_batch_size", _PER_DEVICE_PPO)},
    "batch_size": {"ppo": Alias("training.rollout_batch_size", "episodes per update, all processes together")},
    "local_rollout_forward_batch_size": {"ppo": Alias("training.forward_batch_size")},
    "per_device_eval_batch_size": {"ppo": Alias("training.eval_batch_size")},
    "num_ppo_epochs": {"ppo": Alias("training.ppo_epochs")},
    "num_iterations": {"ppo": Alias("training.ppo_epochs")},
    "beta": {"ppo": Alias("training.kl_coef")},
    "init_kl_coef": {"ppo": Alias("training.kl_coef")},
    "kl_penalty": {"ppo": Alias("training.kl_estimator", "k1 (TRL's `kl`) or k3")},
    "adap_kl_ctrl": {"ppo": Alias("training.adaptive_kl", "a section: target, horizon")},
    "epsilon": {"ppo": Alias("training.cliprange")},
    "whiten_rewards": {"ppo": Alias("training.score_normalization", "`batch` whitens the scores of each rollout "
                                                                    "batch")},
    "adam_epsilon": {"ppo": Alias("training.adam_eps")},
    "lr_scheduler_type": {"ppo": Alias("training.lr_schedule", "linear or constant")},
    "logging_steps": {"ppo": Alias("training.log_every", "counted in updates")},
    "save_steps": {"ppo": Alias("training.save_every", "counted in updates")},
    "num_sample_generations": {"ppo": Alias("training.sample_every", "every this many updates, not this many "
                                                                     "times")},
    "num_train_epochs": {"ppo": Alias("training.total_episodes", _LENGTH_IN_EPISODES)},
    "max_steps": {"ppo": Alias("training.total_episodes", _LENGTH_IN_EPISODES)},
    "sft_model_path": {"ppo": Alias("policy.name_or_path")},
    "reward_model_path": {"ppo": Alias("reward.model")},
}


def alias_for(stage: str, name: str) -> Alias | None:
    """Where `name` goes in a `stage` recipe, by the table alone (the target is not checked against the schema)."""
    entry = TRL_NAMES.get(name, {})
    return entry.get(stage) or entry.get(ANY)
