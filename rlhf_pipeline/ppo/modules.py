"""The networks PPO trains and queries, and the rollout they share.

Every forward pass here computes logits at the response positions alone (the model's own forward with
`logits_to_keep`, so that whatever it does after its LM head is applied): a logits tensor over the whole prompt would
cost batch x length x vocabulary floats for nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.rewards import call_function, uses_trl_convention
from rlhf_pipeline.scoring import RewardModel

# ---------------------------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Prompts:
    """Tokenized prompts: their texts (a conversational prompt through the chat template, ready for the assistant's
    turn), token ids, for conversational data the messages themselves (the reward model reads those), and the
    dataset's other columns (reward functions in TRL's convention receive them as keyword arguments)."""

    texts: list[str]
    ids: list[list[int]]
    messages: list[list[dict]] | None = None
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, rows: list[int]) -> Prompts:
        return Prompts([self.texts[i] for i in rows], [self.ids[i] for i in rows],
                       [self.messages[i] for i in rows] if self.messages is not None else None,
                       {name: [values[i] for i in rows] for name, values in self.columns.items()})

    def repeated(self, k: int) -> Prompts:
        """Each prompt k times in a row (prompt-major groups, as the critic-free estimators read them)."""
        return self.select([i for i in range(len(self)) for _ in range(k)])


@dataclass
class Rollout:
    """A batch of episodes: left-padded prompts, responses padded after their first EOS."""

    query: torch.Tensor  # [B, P] token ids, left-padded
    query_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    response: torch.Tensor  # [B, R] token ids, pad after the first EOS
    response_mask: torch.Tensor  # [B, R] float, 1 up to and including the first EOS
    finished: torch.Tensor  # [B] bool: the response contains EOS
    prompts: Prompts  # the prompts, row for row
    responses: list[str] = field(default_factory=list)  # response texts (special tokens removed)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query, self.response], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask.long()], 1)

    @property
    def response_start(self) -> int:
        return self.query.shape[1]

    def select(self, index: torch.Tensor) -> Rollout:
        rows = index.tolist()
        return Rollout(self.query[index], self.query_mask[index], self.response[index], self.response_mask[index],
                       self.finished[index], self.prompts.select(rows),
                       [self.responses[i] for i in rows] if self.responses else [])


@contextmanager
def seeded(seed: int, device: torch.device):
    """Run a block under its own seed without disturbing the caller's random streams: the CPU generator and the
    accelerator's are forked (restored afterwards), so that every process gets exactly the noise it asks for."""
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(seed)
        yield


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, longest - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, longest - len(seq):] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded prompt reads as it did unpadded in training."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def truncate_after_eos(response: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int):
    """Keep each response up to and including its first EOS (any of them, given several stop tokens); pad the rest.
    Works when pad == EOS too."""
    stops = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
    is_eos = torch.isin(response, torch.tensor(stops, device=response.device))
    finished = is_eos.any(1)
    length = response.shape[1]
    last = torch.where(finished, is_eos.int().argmax(1), torch.full_like(finished, length - 1, dtype=torch.long))
    mask = torch.arange(length, device=response.device)[None, :] <= last[:, None]
    return torch.where(mask, response, torch.full_like(response, pad_token_id)), mask.float(), finished


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokens that end a response: the tokenizer's EOS, and every other end-of-sequence id the model's generation
    config declares (an instruct model's end of turn, e.g. Gemma's `<end_of_turn>` beside `<eos>`), as TRL's GRPO
    trainer takes them. These define where the model's answers end; how it samples comes from the recipe alone."""
    declared = _core(model).generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return [tokenizer.eos_token_id, *(i for i in declared if i != tokenizer.eos_token_id)]


def rollout_generation_config(generation, tokenizer, stops: list[int] | None = None):
    """The sampling settings of a rollout, every one from the recipe's `generation:` section: the policy samples from
    softmax(logits / temperature), top-k / top-p filtered as asked (top_k=0 and top_p=1.0 by default: the full
    softmax), for at most response_length tokens, stopping at the first of `stops` (`stop_token_ids`; default the
    tokenizer's EOS). The same settings are saved as the trained policy's generation_config.json, so that sampling
    from it draws from the distribution PPO trained."""
    from transformers import GenerationConfig

    stops = stops or [tokenizer.eos_token_id]
    return GenerationConfig(max_new_tokens=generation.response_length, do_sample=True,
                            temperature=generation.temperature, top_k=generation.top_k, top_p=generation.top_p,
                            eos_token_id=stops if len(stops) > 1 else stops[0],
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


@contextmanager
def own_generation_config(model: nn.Module, config):
    """`model` (a transformers model, in a peft wrapper or not) with `config` as its generation config for the block.
    transformers fills every field a `generate(generation_config=...)` leaves unset from the checkpoint's own
    generation_config.json: an instruct checkpoint's repetition_penalty, min_new_tokens, no_repeat_ngram_size, min_p,
    bad-words or suppress lists would shape the samples, while PPO's log-probabilities are those of the plain softmax
    at the recipe's temperature. With the checkpoint's file out of the way, only transformers' neutral defaults
    fill the rest."""
    core = _core(model)
    saved = core.generation_config
    core.generation_config = config
    try:
        yield
    finally:
        core.generation_config = saved


@torch.no_grad()
def sample_rollout(policy: nn.Module, tokenizer, prompts: Prompts, generation, device,
                   autocast: Callable = nullcontext) -> Rollout:
    """Sample one response per prompt (HF generate with its KV cache), truncated after the first stop token
    (`stop_token_ids`), with the recipe's sampling settings alone (`rollout_generation_config`, whatever else the
    checkpoint's generation config says).

    Sharded weights must be held whole (`gathered`): generation then needs no other process, and is told so
    (`synced_gpus=False`; transformers would otherwise keep every process stepping until all are done, and hang
    when their numbers of batches differ, as in a held-out evaluation's uneven shards)."""
    stops = stop_token_ids(policy, tokenizer)
    config = rollout_generation_config(generation, tokenizer, stops)
    query, query_mask = left_pad(prompts.ids, tokenizer.pad_token_id)
    query, query_mask = query.to(device), query_mask.to(device)
    was_training = policy.training
    policy.eval()
    with autocast(), own_generation_config(policy, config):
        output = policy.generate(input_ids=query, attention_mask=query_mask, generation_config=config,
                                 synced_gpus=False)
    policy.train(was_training)
    response, response_mask, finished = truncate_after_eos(output[:, query.shape[1]:], stops, tokenizer.pad_token_id)
    responses = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollout(query, query_mask, response, response_mask, finished.cpu(), prompts, responses)


def sequence_logprobs(model: nn.Module, rollout: Rollout, temperature: float, autocast: Callable = nullcontext,
                      adapter_disabled: bool = False, chunk: int = 16) -> torch.Tensor:
    """Summed log-probability of each response under `model` (a causal LM; its LoRA adapter off if asked), `chunk`
    rows at a time: logits cost rows x length x vocabulary floats, which a 50k vocabulary makes large."""
    from rlhf_pipeline.ppo.core import logprobs_of, masked_sum

    device = next(model.parameters()).device
    input_ids, attention_mask = rollout.input_ids.to(device), rollout.attention_mask.to(device)
    response, mask = rollout.response.to(device), rollout.response_mask.to(device)
    sums = []
    with torch.no_grad(), autocast(), (model.disable_adapter() if adapter_disabled else nullcontext()):
        for rows in torch.arange(input_ids.shape[0], device=device).split(chunk):
            logits, _ = response_outputs(model, input_ids[rows], attention_mask[rows], rollout.response_start)
            logprobs = logprobs_of(logits, response[rows], temperature)
            sums.append(masked_sum(logprobs, mask[rows], dim=1))
    return torch.cat(sums)


# ---------------------------------------------------------------------------------------------------------------
# Heads on trunks
# ---------------------------------------------------------------------------------------------------------------


def _core(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected), or the model itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def trunk_of(model: nn.Module) -> nn.Module:
    return _core(model).base_model


def score_head_of(model: nn.Module) -> nn.Module:
    core = _core(model)
    head = getattr(core, "score", None)
    if head is None:
        raise UserError(f"{type(core).__name__} has no `score` head: reward and value models must be "
                        "AutoModelForSequenceClassification checkpoints of a causal LM (e.g. a reward-stage output)")
    return head


def response_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int,
                     hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, last hidden states) at the positions that predict each response token (response_start - 1 ...
    end - 1): [B, R, V] and, when `hidden`, [B, R, H] (else None). The causal LM's own forward, its logits computed at
    those positions alone (`logits_to_keep`): whatever the model does after its LM head (Gemma-2's
    final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling) is applied, as in the `generate` that
    sampled the tokens. The last hidden state is the trunk's output (after its final norm), what the LM head reads.

    `model.forward` is called, not `model(...)`: the hooks an engine puts on the root module stay out, as when the
    trunk and head were called apart. DeepSpeed ZeRO-3's start-of-forward hook is a collective that every process
    must reach, and the held-out evaluation's shards are uneven (5 prompts over 2 processes): it would wait forever.
    The weights are held whole there (`gathered`), and the layers inside keep their own hooks."""
    keep = input_ids.shape[1] - response_start + 1
    output = model.forward(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False, logits_to_keep=keep,
                           output_hidden_states=hidden)
    states = output.hidden_states[-1][:, response_start - 1 : -1] if hidden else None
    return output.logits[:, :-1], states


def response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_start: int) -> torch.Tensor:
    """A trunk's hidden states that predict each response token: positions response_start - 1 ... end - 1 (a
    separate value model reads its score head there)."""
    hidden = trunk_of(model)(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
    return hidden[:, response_start - 1 : -1]


class PolicyAndValue(nn.Module):
    """Everything the optimizer trains, in one module so that Accelerate / DDP wraps it once.

    value `shared`: a linear value head on the policy's last hidden state (one trunk pass for both). The head's
    weights are float32 whatever the policy's dtype, and it reads the hidden state cast to float32: a bf16 or fp16
    policy's values keep full precision (under mixed precision, autocast still runs the head in half precision).
    value `separate`: a value network of its own (a sequence-classification model read at every position).
    No value at all (`critic=False`): the critic-free estimators (rloo, grpo); forward's values are None.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None = None, critic: bool = True):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = None
        if critic and value_model is None:
            hidden_size = _core(policy).config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden_size, 1)
            nn.init.normal_(self.value_head.weight, std=1.0 / math.sqrt(hidden_size + 1))
            nn.init.zeros_(self.value_head.bias)

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None or self.value_model is not None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, values) at the response positions: [B, R, V] and [B, R] (None without a critic)."""
        logits, hidden = response_outputs(self.policy, input_ids, attention_mask, response_start,
                                          hidden=self.value_head is not None)
        if self.value_head is not None:
            values = self.value_head(hidden.float()).squeeze(-1)
        elif self.value_model is None:
            values = None
        else:
            value_hidden = response_hidden(self.value_model, input_ids, attention_mask, response_start)
            values = score_head_of(self.value_model)(value_hidden).squeeze(-1)
        if values is not None:
            values = values.clone()  # not a view of the head's output: FSDP2 warns of a view returned by a forward
        return logits, values

    def tie_weights(self) -> None:
        """Tie each model's output head to its input embeddings again (GPT-2's tied head). Accelerate calls this
        after its FSDP preparation moved the weights through the `meta` device (`fsdp_cpu_ram_efficient_loading`),
        which unties them: without it the policy's head would train as a matrix of its own."""
        for model in (self.policy, self.value_model):
            if model is not None:
                model.tie_weights()

    def value_parameters(self) -> list[nn.Parameter]:
        source = self.value_head if self.value_head is not None else self.value_model
        return [p for p in source.parameters() if p.requires_grad] if source is not None else []

    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]


def reference_logits(reference: nn.Module | None, policy: nn.Module, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
    """Logits of the frozen reference: a separate model, or (reference None) the LoRA policy with its adapter off."""
    if reference is not None:
        return response_outputs(reference, input_ids, attention_mask, response_start)[0]
    with policy.disable_adapter():
        return response_outputs(policy, input_ids, attention_mask, response_start)[0]


# ---------------------------------------------------------------------------------------------------------------
# Scorers: a reward model, or a reward function
# ---------------------------------------------------------------------------------------------------------------


class ModelScorer:
    """A reward model scoring each (prompt, response) on the sequence RewardTrainer builds from it, through the
    model's own forward pass (`rlhf_pipeline.scoring`): the texts are re-tokenized with the reward model's tokenizer,
    whatever the policy's vocabulary."""

    def __init__(self, reward_model: RewardModel):
        self.reward_model = reward_model
        self.tokenizer = reward_model.tokenizer

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        if rollout.prompts.messages is not None:
            prompts: list = rollout.prompts.messages
            responses: list = [[{"role": "assistant", "content": r}] for r in rollout.responses]
        else:
            prompts, responses = rollout.prompts.texts, rollout.responses
        return self.reward_model.score(prompts, responses)


def scorer_model(scorer) -> nn.Module | None:
    """The reward model a scorer runs; None for a Python function (or no scorer)."""
    return scorer.reward_model.model if isinstance(scorer, ModelScorer) else None


class FunctionScorer:
    """A Python reward function; `name` (`module:function`) names it in errors. Two conventions (rewards.py):
    ours, f(prompts, responses, finished=...) over texts, and TRL's, f(prompts=, completions=, completion_ids=,
    **columns), which also gets the dataset's other columns, the trainer's progress and `log_metric` / `log_extra`."""

    def __init__(self, function: Callable, name: str | None = None):
        self.function = function
        self.name = name
        self.progress = TrainingProgress()
        self.metrics: dict[str, list[float]] = {}  # from log_metric, averaged into the next log row
        self.extra: dict[str, list] = {}  # from log_extra, one value per response of the last batch

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        if not uses_trl_convention(self.function):
            scores = call_function(self.function, rollout.prompts.texts, rollout.responses, rollout.finished.tolist(),
                                   self.name)
            return torch.tensor(scores, dtype=torch.float32)
        self.extra = {}
        if rollout.prompts.messages is not None:  # conversational, as TRL passes them
            prompts: list = rollout.prompts.messages
            completions: list = [[{"role": "assistant", "content": r}] for r in rollout.responses]
        else:
            prompts, completions = rollout.prompts.texts, rollout.responses
        completion_ids = [row[mask.bool()].tolist() for row, mask in zip(rollout.response.cpu(),
                                                                          rollout.response_mask.cpu())]
        keywords = {**rollout.prompts.columns, "completion_ids": completion_ids, "trainer_state": self.progress,
                    "log_metric": lambda name, value: self.metrics.setdefault(name, []).append(float(value)),
                    "log_extra": lambda column, values: self.extra.setdefault(column, []).extend(values)}
        scores = call_function(self.function, prompts, completions, rollout.finished.tolist(), self.name,
                               keywords=keywords)
        return torch.tensor(scores, dtype=torch.float32)

    def take_metrics(self, prefix: str) -> dict[str, float]:
        """The means of what the function logged with log_metric since the last call, as `<prefix>/<name>`."""
        taken = {f"{prefix}/{name}": sum(values) / len(values) for name, values in self.metrics.items() if values}
        self.metrics = {}
        return taken


@dataclass
class TrainingProgress:
    """What TRL's reward functions may read from `trainer_state`: where training is (updates count as steps)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


# ---------------------------------------------------------------------------------------------------------------
# sharded engines (FSDP)
# ---------------------------------------------------------------------------------------------------------------
@contextmanager
def whole_weights(model: nn.Module, reshard_after_forward: bool = True):
    """The trained model's parameters gathered whole for the length of the block, under FSDP2 (`fully_shard`).

    Generation, the scoring passes, the held-out evaluation and the final save call the policy (and the value model)
    outside the wrapped model's own forward, and FSDP gathers a unit's parameters only when that unit's forward
    runs: the root unit's (embeddings, final norm, heads) would stay sharded. So every unit is gathered here, once,
    and kept gathered (no re-sharding after each forward) until the block ends: generating N tokens then costs one
    all-gather per unit instead of N, at the price of one whole copy of the trained model on each device while the
    block runs (what TRL's `unwrap_model_for_generation` does under ZeRO-3). Afterwards the units re-shard after
    their forward as configured (`reshard_after_forward`; the root never does, FSDP's own rule). Without FSDP it does
    nothing."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if units and units[0] is model:
        # FSDP names its root when a forward first runs: it must be `model`, not the first block a generation
        # reaches, or the wrapped model's own forward fails later (no public call does this but a forward)
        model._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    # transformers' Trainer registers `generate` as an FSDP forward method (an attribute of the instance): its hooks
    # re-shard the root unit when generation ends, whatever reshard_after_forward says. Everything being gathered
    # here, the class's own method runs instead
    registered = model.__dict__.pop("generate", None) if units else None
    try:
        yield
    finally:
        if registered is not None:
            model.generate = registered
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(reshard_after_forward and unit is not model, recurse=False)


@contextmanager
def gathered(accelerator, *models: nn.Module | None):
    """Each of `models` (None skipped) held whole for the length of the block, where code calls a model's parts
    directly (the trunk, then a head) or runs a share of the work that differs between processes (the held-out
    evaluation's uneven shards: a forward that gathered shards itself would wait on a process that has finished).
    Under FSDP each is gathered by `whole_weights`; under DeepSpeed ZeRO-3 its partitioned parameters are gathered
    by TRL's `unwrap_model_for_generation` (pass the engine, whose hooks it lifts); otherwise nothing is done.
    Every process must enter it."""
    from contextlib import ExitStack

    from accelerate.utils import DistributedType

    engine = accelerator.distributed_type
    zero3 = engine == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    with ExitStack() as stack:
        for model in models:
            if model is None:
                continue
            if engine == DistributedType.FSDP:
                reshard = bool(accelerator.state.fsdp_plugin.reshard_after_forward)
                stack.enter_context(whole_weights(model, reshard))
            elif zero3:
                from trl.models import unwrap_model_for_generation

                stack.enter_context(unwrap_model_for_generation(model, accelerator))
        yield


def policy_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's own entries of a `PolicyAndValue` state dict (as `accelerator.get_state_dict` gathers it, whole,
    under FSDP too), named as the policy names them."""
    prefix = "policy."
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def prepare_frozen(model: nn.Module, accelerator) -> nn.Module:
    """A frozen model (reference, reward, gold) ready for inference under the launch's engine, as TRL prepares them:
    sharded like the trained model under FSDP (`trl.models.prepare_fsdp`), an inference engine under DeepSpeed
    (`trl.models.prepare_deepspeed`: whole weights in the run's precision under ZeRO-1/2), on the device otherwise."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from trl.models import prepare_fsdp

        return prepare_fsdp(model, accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    return model.to(accelerator.device)
