"""The arithmetic of `rlhf plan`: batch sizes, FLOPs and peak memory per device, from shapes and settings alone.

No torch, no weights: every function here is plain arithmetic on a `ModelShape` (rlhf_pipeline/model_shape.py, which
counts any architecture's parameters exactly) and a few numbers, so that each term can be checked by hand
(tests/test_plan.py). What a recipe says is turned into these numbers by `plan_recipe.py`.

The memory model, in one place (bytes per device; `d` = hidden size, `f` = MLP width, `a` = heads, `q` = the
queries' width (heads x head_dim), `kv` = the keys' width (key/value heads x head_dim), `L` = padded sequence length,
`V` = vocabulary, `c` = bytes of a value computed by a matmul: 2 under bf16/fp16 autocast, else the weights' dtype):

- weights: parameters x bytes of the stored dtype (fp32: 4). Autocast keeps fp32 weights; while a model trains under
  autocast, a 16-bit copy of its weights is alive too (autocast caches the casts of trained weights, and saves the
  casts of frozen ones for the backward pass): + 2 bytes per parameter during forward/backward.
- gradients: trainable parameters x bytes of their dtype; they exist from the first backward to the optimizer step
  (both trainers set them to None after each step). AdamW state: 2 x the trainable parameters' dtype (fp32: 8).
  DDP adds gradient buckets as large as the gradients, for the life of the run.
- sharding (Accelerate config): ZeRO-1 splits the optimizer state, ZeRO-2 also the gradients, ZeRO-3 and FSDP full
  shard also the weights, each over the processes; DeepSpeed under mixed precision keeps 16-bit weights and
  gradients and 12 bytes of optimizer state per parameter (fp32 master copy + AdamW; the ZeRO paper's accounting).
  A sharded model gathers weights to compute: FSDP one wrapped unit at a time (a decoder layer, or the embeddings)
  plus the one prefetched; ZeRO-3 keeps up to `stage3_max_live_parameters` (default 1e9) gathered. DeepSpeed's own
  buffers (`ZeroSettings`): ZeRO-1/2 a reduce bucket of `reduce_bucket_size` elements (5e8 by default; two with
  overlap_comm) during each backward, ZeRO-3 one for the whole run and its small parameters whole on every device.
- activations saved for backward, per token and layer (what autograd saves in transformers 5's GPT-2 with SDPA
  attention, which stores no L x L scores, counted with saved-tensor hooks): the layer-norm inputs at the weights'
  dtype (d each; an RMSNorm also keeps its normalized input) plus, at `c` bytes, 2d + 2q + 2kv (the two norms'
  outputs, the queries and the attention output, keys and values; with a padding mask transformers repeats the
  key/value heads, kv = q) and the MLP's hidden layer: 2f with a one-op GELU (ReLU: f), 5f with GPT-2's `gelu_new`
  written as six tensor ops (PPO fuses it; TRL stages do not; under CUDA autocast three of those are fp32:
  `mlp_hidden_bytes`), 2f more for a gated MLP; `a` log-sum-exp floats; padded batches add one L x L additive mask
  per layer and row; dropout its masks. Backward adds about two MLP-wide gradients. Gradient checkpointing keeps
  only each block's input (d) plus one block recomputed in full. Measured on GPT-2; other architectures carried over
  by width and marked approximate in the plan (tests/test_plan.py compares five families on a CPU).
- the loss head (often the largest term for GPT-2: V = 50,257): see `loss_head_bytes`.
- generation: the KV cache, 2 x kv x the token-layers the cache keeps x `c` (a sliding-window layer keeps its window:
  `ModelShape.cached_tokens`), plus one prefill layer's transients.

Peak = what is always there (weights, optimizer state, DDP buckets; on a GPU, cuBLAS workspaces) + the largest phase
(generation, scoring, forward/backward, optimizer step, evaluation). Not counted: the Python runtime and libraries,
data held in host memory, the CUDA context, allocator fragmentation, and communication buffers other than DeepSpeed's
reduce buckets; hence a plan "fits" only under FIT_FRACTION of the device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import UserError, did_you_mean
from rlhf_pipeline.model_shape import ModelShape

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": KIB, "mib": MIB, "gib": GIB, "tib": TIB}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
FIT_FRACTION = 0.9  # "fits" only when the estimated peak stays below this fraction of --device-memory
TOKEN_TILE, VOCAB_TILE = 4096, 32768  # TRL's fused LM head: [tokens, vocabulary] tiles of the logits
REWARD_SCORING_BATCH = 64  # rows per reward-model forward (rlhf_pipeline.scoring.RewardModel)
LOGPROB_CHUNK = 16  # rows per forward in the held-out evaluation (ppo.modules.sequence_logprobs)
# PyTorch allocates cuBLAS workspaces through its caching allocator: 32 MiB each on Hopper (sm90; 8 MiB on older
# GPUs), one for the thread that runs the forward and one for the autograd thread that runs the backward
CUBLAS_WORKSPACES = 2 * 32 * MIB


# ---------------------------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------------------------
def parse_size(text: str, option: str = "--device-memory") -> int:
    """Bytes from "24GiB", "80GB", "512MiB", "1.5TiB" (binary units *iB, decimal units *B)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match and unit in SIZE_UNITS and float(match.group(1)) > 0:
        return int(float(match.group(1)) * SIZE_UNITS[unit])
    hint = ""
    if match and unit in ("k", "m", "g", "t"):
        hint = f" ({match.group(1)}{unit.upper()}iB or {match.group(1)}{unit.upper()}B?)"
    elif match and unit:
        hint = did_you_mean(match.group(2), ["KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"])
    raise UserError(f"{option}: expected a positive size with a unit, such as 24GiB, 80GB or 512MiB; got "
                    f"{text!r}{hint}")


def format_bytes(n: float) -> str:
    for unit, size in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_flops(n: float) -> str:
    for unit, size in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} FLOP"


def fit_limit(device_memory: int) -> int:
    """The most a plan may peak at to be called a fit on a device of `device_memory` bytes: FIT_FRACTION of it,
    a margin for what the estimate leaves out (the runtime, the CUDA context, fragmentation) and for its error."""
    return int(FIT_FRACTION * device_memory)


# ---------------------------------------------------------------------------------------------------------------
# Accelerate configs: how the processes split the work
# ---------------------------------------------------------------------------------------------------------------
FSDP_V1_STRATEGIES = {"1": "fsdp-full", "FULL_SHARD": "fsdp-full", "2": "fsdp-grad-op", "SHARD_GRAD_OP": "fsdp-grad-op",
                      "3": "ddp", "NO_SHARD": "ddp", "4": "fsdp-hybrid", "HYBRID_SHARD": "fsdp-hybrid",
                      "5": "fsdp-hybrid", "HYBRID_SHARD_ZERO2": "fsdp-hybrid"}


@dataclass(frozen=True)
class ZeroSettings:
    """What DeepSpeed ZeRO allocates beyond the sharded model state, from the `zero_optimization` section of a
    DeepSpeed config (DeepSpeed's defaults where it is silent; "auto", which transformers' Trainer and Accelerate
    resolve from the model's hidden size h, is kept as "auto" and resolved per model: `resolve`).

    ZeRO-1/2 (stage_1_and_2.py): with contiguous_gradients (default on) every backward allocates a flat buffer of
    reduce_bucket_size elements at the gradients' dtype, two with overlap_comm (default off below stage 3), freed when
    the backward's reduction ends. allgather_bucket_size allocates nothing where the communication backend gathers
    into a tensor (NCCL: `all_gather_into_tensor` writes into the flat 16-bit weights in place).
    ZeRO-3 (stage3.py): one reduce buffer of reduce_bucket_size, for the whole run; parameters smaller than
    stage3_param_persistence_threshold stay whole on every device; up to stage3_max_live_parameters gathered at once
    (prefetched ones included)."""

    reduce_bucket_size: int | str = 500_000_000  # elements; "auto": h x h
    overlap_comm: bool | None = None  # None: DeepSpeed's default, on for ZeRO-3 only
    contiguous_gradients: bool = True
    allgather_bucket_size: int = 500_000_000
    persistence_threshold: int | str = 100_000  # stage3_param_persistence_threshold; "auto": 10 x h
    max_live_parameters: int = 1_000_000_000  # stage3_max_live_parameters

    def reduce_bucket(self, hidden: int) -> int:
        return hidden * hidden if self.reduce_bucket_size == "auto" else int(self.reduce_bucket_size)

    def persistence(self, hidden: int) -> int:
        return 10 * hidden if self.persistence_threshold == "auto" else int(self.persistence_threshold)

    def overlapping(self, stage: int) -> bool:
        return stage == 3 if self.overlap_comm is None else self.overlap_comm


@dataclass(frozen=True)
class Distribution:
    """How a run is spread over processes, read from an Accelerate config (or assumed: one process on one GPU).

    strategy: "single" (one process), "ddp" (every process holds everything), "zero1" / "zero2" / "zero3"
    (DeepSpeed), "fsdp-full" (full shard), "fsdp-grad-op" (weights gathered from forward to backward),
    "fsdp-hybrid" (full shard within each machine)."""

    strategy: str = "single"
    processes: int = 1
    machines: int = 1
    device: str = "gpu"  # "gpu" or "cpu"
    mixed_precision: str | None = None  # the config's own setting, when it has one
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False  # FSDP's own (fsdp_activation_checkpointing)
    fsdp_version: int = 2
    source: str = "no Accelerate config: one process"
    zero: ZeroSettings = ZeroSettings()  # DeepSpeed's buffers (read only under DeepSpeed)

    @property
    def deepspeed(self) -> bool:
        return self.strategy.startswith("zero")

    @property
    def fsdp(self) -> bool:
        return self.strategy.startswith("fsdp")

    @property
    def data_parallel_wrapper(self) -> bool:
        """DDP wraps the trained model (and holds gradient buckets) only with several processes."""
        return self.strategy == "ddp" and self.processes > 1

    def ways(self, part: str) -> int:
        """Into how many pieces `part` ("weights", "grads" or "optimizer") of a prepared model is split."""
        sharded = {
            "zero1": {"optimizer"}, "zero2": {"grads", "optimizer"}, "zero3": {"weights", "grads", "optimizer"},
            "fsdp-full": {"weights", "grads", "optimizer"}, "fsdp-grad-op": {"weights", "grads", "optimizer"},
            "fsdp-hybrid": {"weights", "grads", "optimizer"},
        }.get(self.strategy, set())
        if part not in sharded:
            return 1
        if self.strategy == "fsdp-hybrid":
            return max(1, self.processes // max(1, self.machines))
        return self.processes

    def describe(self) -> str:
        n = self.processes
        what = {
            "single": "one process, nothing sharded",
            "ddp": f"data parallel (DDP) over {n} processes: every process holds whole models",
            "zero1": f"DeepSpeed ZeRO-1 over {n} processes: optimizer state split {n} ways",
            "zero2": f"DeepSpeed ZeRO-2 over {n} processes: optimizer state and gradients split {n} ways",
            "zero3": f"DeepSpeed ZeRO-3 over {n} processes: weights, gradients and optimizer state split {n} ways",
            "fsdp-full": f"FSDP full shard over {n} processes: weights, gradients and optimizer state split {n} ways",
            "fsdp-grad-op": f"FSDP SHARD_GRAD_OP over {n} processes: split {n} ways at rest, weights gathered from "
                            "forward to backward",
            "fsdp-hybrid": f"FSDP hybrid shard: split {self.ways('weights')} ways within each of {self.machines} "
                           "machines",
        }[self.strategy]
        extras = [x for x, on in (("optimizer state offloaded to the CPU", self.offload_optimizer),
                                  ("weights offloaded to the CPU", self.offload_params),
                                  ("FSDP activation checkpointing", self.activation_checkpointing)) if on]
        device = "CPU" if self.device == "cpu" else "GPU"
        return f"{what}{'; ' + ', '.join(extras) if extras else ''} ({device}; {self.source})"


def default_distribution(processes: int | None = None) -> Distribution:
    """No Accelerate config: one process on one GPU, or `processes` under DDP (`accelerate launch --num_processes`,
    `torchrun`)."""
    if processes and processes > 1:
        return Distribution("ddp", processes, source=f"no Accelerate config: --processes {processes}, data parallel")
    return Distribution()


def read_accelerate_config(path: str | Path, processes: int | None = None) -> Distribution:
    """A standard Accelerate config YAML (`accelerate config`'s output; recipes/accelerate/ holds examples), checked
    as `rlhf recipe validate` checks it, then read: distributed_type, num_processes (`processes` overrides it),
    num_machines, use_cpu, mixed_precision, fsdp_config and deepspeed_config (a referenced deepspeed_config_file is
    read when it exists)."""
    import yaml

    from rlhf_pipeline.recipe import accelerate_config

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--accelerate-config: no such file: {path}")
    if accelerate_config.check_file(path) is None:  # raises a RecipeError naming file:line: key for each problem
        raise UserError(f"--accelerate-config: {path} is not an Accelerate config (it has no distributed_type)")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    kind = str(config.get("distributed_type", "NO")).upper()
    n = int(processes or config.get("num_processes") or 1)
    if kind == "NO" and n > 1:  # `accelerate launch` then runs its simple launcher (the file's own count: validated)
        raise UserError(f"--processes {n}: {path} has distributed_type NO, under which `accelerate launch` runs one "
                        f"process, not {n}; for {n} processes plan with a multi-process config "
                        "(recipes/accelerate/ddp.yaml, or FSDP / DeepSpeed), or without --accelerate-config")
    machines = int(config.get("num_machines") or 1)
    cpu = bool(config.get("use_cpu")) or kind == "MULTI_CPU"
    mixed = config.get("mixed_precision")
    mixed = None if mixed is None else str(mixed).lower()
    source = f"{path}" + (f", --processes {processes}" if processes else "")
    common = {"processes": n, "machines": machines, "device": "cpu" if cpu else "gpu", "mixed_precision": mixed,
              "source": source}
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        version = int(fsdp.get("fsdp_version", fsdp.get("version", 1)))
        if version >= 2:
            strategy = "fsdp-full" if _truthy(fsdp.get("fsdp_reshard_after_forward", True)) else "fsdp-grad-op"
        else:
            choice = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
            strategy = FSDP_V1_STRATEGIES.get(choice, "fsdp-full")
        offload = _truthy(fsdp.get("fsdp_offload_params", False))
        return Distribution(strategy, offload_params=offload, offload_optimizer=offload, fsdp_version=version,
                            activation_checkpointing=_truthy(fsdp.get("fsdp_activation_checkpointing", False)),
                            **common)
    if kind == "DEEPSPEED":
        ds = dict(config.get("deepspeed_config") or {})
        zero = _deepspeed_file(ds.get("deepspeed_config_file"))
        ds.update(zero.pop("accelerate", {}))
        stage = int(ds.get("zero_stage", 2))
        if stage == 0:
            return Distribution("ddp" if n > 1 else "single", **common)
        return Distribution(f"zero{stage}", offload_optimizer=_offloaded(ds.get("offload_optimizer_device")),
                            offload_params=stage == 3 and _offloaded(ds.get("offload_param_device")),
                            zero=ZeroSettings(**zero), **common)
    return Distribution("ddp" if n > 1 else "single", **common)


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _offloaded(device: Any) -> bool:
    return str(device or "none").lower() in ("cpu", "nvme")


# DeepSpeed's zero_optimization keys (and their stage3_ spellings) -> ZeroSettings fields
ZERO_KEYS = {"reduce_bucket_size": "reduce_bucket_size", "overlap_comm": "overlap_comm",
             "contiguous_gradients": "contiguous_gradients", "allgather_bucket_size": "allgather_bucket_size",
             "stage3_param_persistence_threshold": "persistence_threshold",
             "param_persistence_threshold": "persistence_threshold",
             "stage3_max_live_parameters": "max_live_parameters", "max_live_parameters": "max_live_parameters"}


def _deepspeed_file(name: Any) -> dict[str, Any]:
    """From a DeepSpeed JSON config, when the Accelerate config names one: the ZeroSettings fields it sets, and under
    "accelerate" the zero_stage and offload devices (the Accelerate config's own key names)."""
    import json

    if not name or not Path(str(name)).is_file():
        return {}
    try:
        zero = json.loads(Path(str(name)).read_text()).get("zero_optimization") or {}
    except (ValueError, AttributeError):
        return {}
    accelerate: dict[str, Any] = {}
    if "stage" in zero:
        accelerate["zero_stage"] = zero["stage"]
    for key, target in (("offload_optimizer", "offload_optimizer_device"), ("offload_param", "offload_param_device")):
        if isinstance(zero.get(key), dict):
            accelerate[target] = zero[key].get("device")
    out: dict[str, Any] = {"accelerate": accelerate}
    for key, field_name in ZERO_KEYS.items():
        value = zero.get(key)
        if value is None:
            continue
        if field_name in ("overlap_comm", "contiguous_gradients"):
            out[field_name] = _truthy(value)
        elif value == "auto" and field_name in ("reduce_bucket_size", "persistence_threshold"):
            out[field_name] = "auto"
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[field_name] = int(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the models a stage holds
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """weights: bytes of a stored weight; compute: bytes of what a matmul produces; autocast: "no", "bf16", "fp16"."""

    weights: int = 4
    compute: int = 4
    autocast: str = "no"

    @classmethod
    def of(cls, dtype: str, mixed_precision: str) -> Precision:
        weights = DTYPE_BYTES.get(dtype, 4)
        if mixed_precision in ("bf16", "fp16") and weights > 2:
            return cls(weights, 2, mixed_precision)
        return cls(weights, weights, "no")

    def describe(self) -> str:
        stored = {4: "fp32", 2: "16-bit"}[self.weights]
        if self.autocast != "no":
            return f"{self.autocast} mixed precision ({stored} weights, {self.autocast} autocast)"
        return f"{stored} weights, no autocast"


@dataclass(frozen=True)
class HeldModel:
    """One model on the device: what it is, how it trains, and what its activations cost."""

    role: str  # policy, reference, reward, value, gold, model
    source: str  # where its shape came from
    shape: ModelShape
    head: str = "lm"  # "lm" (a causal LM) or "score" (a sequence classifier: reward and value models)
    trains: str = "all"  # "all", "lora" or "frozen"
    trainable: int = 0  # trained parameters (LoRA: the adapters, plus a classifier's score head)
    dtype: str = "float32"
    prepared: bool = True  # passed to accelerator.prepare, so ZeRO-3 / FSDP shard it
    gelu_ops: int = 1  # tensors the MLP activation saves beside its output: 0 (ReLU), 1 (one op), 4 (gelu_new)
    dropout: float = 0.0  # residual dropout active while it trains
    lora_dropout: float = 0.0  # dropout on the LoRA inputs, active while it trains
    lora_inputs: int = 0  # elements per token and layer that the LoRA adapters read (their dropout copies)
    extra_parameters: int = 0  # a value head on the trunk (PPO, value.mode shared): counted and trained

    @property
    def parameters(self) -> int:
        """The causal LM's parameters, or the sequence classifier's (a score head instead of the LM head), plus a
        value head on the trunk."""
        if self.head == "score":
            counted = self.shape.classifier_parameters
            if counted is None:
                raise ValueError(f"transformers has no sequence classifier for {self.shape.model_type}")
            return counted + self.extra_parameters
        return self.shape.parameters + self.extra_parameters

    @property
    def trainable_parameters(self) -> int:
        return {"all": self.parameters, "lora": self.trainable}.get(self.trains, 0)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def trained(self) -> bool:
        return self.trains != "frozen"


def lora_targets(shape: ModelShape, target_modules: Any) -> list[tuple[str, int, int]]:
    """The linear layers a peft `target_modules` adapts, as peft matches them: "all-linear" every linear layer but the
    output head; a list of names a module whose full name is one of them or ends in "." + one of them."""
    layers = shape.linear_layers()
    if target_modules == "all-linear":
        return list(layers)
    names = [str(n) for n in target_modules]
    return [layer for layer in layers if any(layer[0] == n or layer[0].endswith("." + n) for n in names)]


def lora_parameters(shape: ModelShape, r: int, target_modules: Any) -> int:
    """Parameters of LoRA adapters of rank r: r x (inputs + outputs) per adapted layer."""
    return sum(r * (n_in + n_out) for _, n_in, n_out in lora_targets(shape, target_modules))


def lora_input_elements(shape: ModelShape, target_modules: Any) -> int:
    """Elements per token and decoder layer that the adapted layers read (what LoRA dropout copies)."""
    return round(sum(n_in for _, n_in, _ in lora_targets(shape, target_modules)) / shape.n_layer)


# ---------------------------------------------------------------------------------------------------------------
# memory terms: small pure functions, each checked by hand in tests/test_plan.py
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelState:
    """What a model keeps on a device between steps (weights, optimizer state) and what its backward adds (grads)."""

    weights: int = 0
    grads: int = 0
    optimizer: int = 0


def model_state(model: HeldModel, precision: Precision, dist: Distribution) -> ModelState:
    """Weights, gradients and optimizer state of one model on one device. A model that trains "all" has every
    parameter trainable; "lora" keeps its base weights frozen at their dtype and trains fp32 adapters (as peft
    makes them)."""
    shard = dist.ways("weights") if model.prepared else 1
    stored = model.dtype_bytes
    if not model.trained:
        return ModelState(weights=math.ceil(model.parameters * stored / shard))
    deepspeed_mixed = dist.deepspeed and precision.autocast != "no"
    if deepspeed_mixed:  # 16-bit weights and gradients, fp32 master weights + AdamW (the ZeRO paper's 2 + 2 + 12)
        w, g, o = 2, 2, 12
    elif model.trains == "lora":
        w, g, o = 4, 4, 8
    else:
        w, g, o = stored, stored, 2 * stored
    trainable = model.trainable_parameters
    base = model.parameters if model.trains == "lora" else 0  # adapters come on top of the whole base
    weights = (base * (2 if deepspeed_mixed else stored) + trainable * w) / shard
    grads = trainable * g / dist.ways("grads")
    optimizer = trainable * o / dist.ways("optimizer")
    if dist.offload_params:
        weights = grads = 0
    if dist.offload_optimizer:
        optimizer = 0
    return ModelState(math.ceil(weights), math.ceil(grads), math.ceil(optimizer))


def block_activation_bytes(model: HeldModel, rows: int, length: int, precision: Precision, *, dist: Distribution,
                           checkpointing: bool = False, padded: bool = True, train_dropout: bool = True) -> int:
    """Bytes one forward pass over `rows` sequences of `length` tokens saves for backward, through the trunk
    (the loss head is `loss_head_bytes`). See the module docstring for the per-token, per-layer terms."""
    shape = model.shape
    d, f, a, q = shape.n_embd, shape.mlp_width, shape.n_head, shape.attention_width
    kv = q if padded else shape.kv_width  # with a padding mask transformers repeats the key/value heads for SDPA
    tokens = rows * length
    residual, c = precision.weights, precision.compute
    norms = shape.norms_per_layer * d * residual * (2 if shape.rms_norm else 1)  # RMSNorm: + the normalized input
    per_token = norms + (2 * d + 2 * q + 2 * kv) * c + mlp_hidden_bytes(model, precision, dist) * f + a * 4
    if train_dropout and model.dropout > 0:  # two residual dropouts; a GPU keeps a bool mask, the CPU a float one
        per_token += 2 * d * (1 if dist.device == "gpu" else c)
    if train_dropout and model.lora_dropout > 0:  # the dropped-out copies of the adapters' inputs, and their masks
        per_token += model.lora_inputs * (c + (1 if dist.device == "gpu" else c))
    per_layer = tokens * per_token + (rows * length * length * c if padded else 0)
    outside = tokens * (3 if shape.rms_norm else 2) * d * residual  # the final norm's input and output
    if checkpointing:  # each block's input, plus one block recomputed during backward
        return shape.n_layer * tokens * d * residual + per_layer + outside
    return shape.n_layer * per_layer + outside


def mlp_hidden_bytes(model: HeldModel, precision: Precision, dist: Distribution) -> int:
    """Bytes saved per element of the MLP's hidden layer: its input to the activation and the activation's output
    (2 x c) with a one-op GELU (ReLU: its output only, c); GPT-2's `gelu_new` (six tensor ops) saves three more
    tensors, at c bytes, except under CUDA autocast, where `pow` runs in fp32 (its input is saved as an fp32 copy) and
    the tanh and its sum stay fp32: 4 + 4 + c + 4 + c bytes. A gated MLP (act(gate) x up) also saves the up
    projection and the product."""
    c = precision.compute
    gated = 2 * c if model.shape.gated_mlp else 0
    if model.gelu_ops <= 1:  # ReLU saves only its output (the next matmul's input)
        return (1 + model.gelu_ops) * c + gated
    if precision.autocast != "no" and dist.device == "gpu":
        return 12 + 2 * c + gated
    return 5 * c + gated


def backward_working_bytes(model: HeldModel, rows: int, length: int, precision: Precision) -> int:
    """What backward adds while the saved activations are still held: the gradients flowing through the last block's
    MLP, about two tensors of its hidden width (measured: 6 MiB on top of 92 MiB for the tiny reward model)."""
    return 2 * rows * length * model.shape.mlp_width * precision.compute


def loss_head_bytes(kind: str, tokens: int, vocab: int, precision: Precision, dist: Distribution,
                    backward: bool = True) -> int:
    """Peak bytes of the output head over `tokens` positions, beyond the saved activations; `backward=False`: a
    forward pass without gradients (evaluation).

    - "hf-lm" (pretrain: the model's own loss): the logits, an fp32 copy under autocast, log-softmax, and in
      backward its gradient and the logits' gradient: max(c + 4 + 4, 12) bytes per position and vocabulary entry
      (fp32: 12); forward only: c + 4 (+ 4 for the copy).
    - "trl-fused" (SFT, DPO: TRL's fused LM head): no full logits, [4,096 x 32,768] tiles of them. With Triton (a
      GPU) one tile buffer, updated in place; on a CPU TRL's torch fallback keeps about 8 fp32 temporaries of a tile
      alive in backward, 3 in forward.
    - "ppo-lm" (our PPO, response positions only): the logits, and in backward their gradient (2c bytes per
      position and entry); `ppo.core.logprobs_of` works a block of rows at a time (4 MiB of fp32 on a CPU, 256 MiB on
      a GPU), with about three block-sized temporaries; forward only: the logits and the blocks.
    - "score" (reward and value models): one number per position.
    """
    c = precision.compute
    copy = 4 if c < 4 else 0
    if kind == "score":
        return tokens * 4
    if kind == "hf-lm":
        return tokens * vocab * (max(c + copy + 4, 12) if backward else c + copy + 4)
    if kind == "trl-fused":  # the tile buffer is 32,768 wide whatever the vocabulary; a CPU touches what it uses
        if dist.device == "gpu":
            return min(tokens, TOKEN_TILE) * VOCAB_TILE * c
        return min(tokens, TOKEN_TILE) * min(vocab, VOCAB_TILE) * (c + (8 if backward else 3) * 4)
    if kind == "ppo-lm":
        blocks = 3 * min(tokens * vocab * 4, (4 if dist.device == "cpu" else 256) * MIB)
        return tokens * vocab * (2 * c if backward else c) + blocks
    raise ValueError(f"unknown loss head {kind!r}")


def kv_cache_bytes(shape: ModelShape, rows: int, length: int, precision: Precision, prompt: int = 0) -> int:
    """Keys and values of every layer for `rows` sequences of `length` tokens (`prompt` of them prefilled): the
    key/value heads' width (grouped-query attention caches fewer heads than it queries), a sliding-window layer its
    window (ModelShape.cached_tokens)."""
    return 2 * shape.kv_width * shape.cached_tokens(length, prompt) * rows * precision.compute


def no_grad_forward_bytes(model: HeldModel, rows: int, length: int, precision: Precision,
                          padded: bool = True) -> int:
    """Transient bytes of a forward pass without gradients: one layer's tensors at a time (the residual stream, the
    layer-norm output, the MLP's hidden layer and the activation's temporaries) plus that layer's L x L mask."""
    shape = model.shape
    d, f = shape.n_embd, shape.mlp_width
    hidden = (2 if model.gelu_ops <= 1 else 4) + (1 if shape.gated_mlp else 0)  # gated: gate, up, their product
    per_token = 2 * d * precision.weights + hidden * f * precision.compute
    return rows * length * per_token + (rows * length * length * precision.compute if padded else 0)


def whole_bytes(model: HeldModel, precision: Precision) -> int:
    """A sharded model's weights gathered whole, in the precision it computes in."""
    return model.parameters * (precision.compute if precision.autocast != "no" else model.dtype_bytes)


def gathered_bytes(model: HeldModel, precision: Precision, dist: Distribution) -> int:
    """Weights a sharded model gathers to compute: FSDP full shard one wrapped unit (a block, or the embeddings)
    plus the one prefetched; SHARD_GRAD_OP the whole model, and so does a frozen model under FSDP (trl's
    `prepare_fsdp` shards it as one unit); ZeRO-3 up to stage3_max_live_parameters."""
    if not model.prepared or dist.ways("weights") == 1:
        return 0
    shape = model.shape
    c = precision.compute if precision.autocast != "no" else model.dtype_bytes
    block = shape.block_parameters
    root = model.parameters - shape.n_layer * block
    if dist.strategy == "zero3":
        return min(model.parameters, dist.zero.max_live_parameters) * c
    if dist.strategy == "fsdp-grad-op" or not model.trained:
        return model.parameters * c
    return (max(block, root) + block) * c


def autocast_copy_bytes(model: HeldModel, precision: Precision, dist: Distribution) -> int:
    """The 16-bit copy of a trained model's weights that autocast keeps through forward/backward (none without
    autocast; under ZeRO-3 / FSDP the gathered weights are that copy)."""
    if precision.autocast == "no" or not model.trained or dist.ways("weights") > 1 or dist.deepspeed:
        return 0
    return model.parameters * precision.compute


# ---------------------------------------------------------------------------------------------------------------
# memory plans: what is always there, then the phases of a step
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Term:
    what: str
    bytes: int


@dataclass
class Phase:
    name: str
    terms: list[Term]

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)


@dataclass
class MemoryPlan:
    models: list[tuple[HeldModel, ModelState]]
    static: list[Term]
    phases: list[Phase]
    precision: Precision
    distribution: Distribution
    notes: list[str] = field(default_factory=list)

    @property
    def static_total(self) -> int:
        return sum(t.bytes for t in self.static)

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak(self) -> int:
        return self.static_total + self.peak_phase.total


def activation_precision(precision: Precision, dist: Distribution) -> Precision:
    """The precision activations are computed in. Under DeepSpeed or FSDP with mixed precision the weights are
    computed with in 16 bits (DeepSpeed keeps 16-bit module weights; FSDP gathers them in 16 bits), so the residual
    stream is 16-bit too; under autocast it stays at the weights' dtype."""
    if precision.autocast != "no" and (dist.deepspeed or dist.fsdp):
        return Precision(2, 2, precision.autocast)
    return precision


def _static_terms(models: list[HeldModel], precision: Precision, dist: Distribution):
    states = [(m, model_state(m, precision, dist)) for m in models]
    static = [Term("cuBLAS workspaces", CUBLAS_WORKSPACES)] if dist.device == "gpu" else []
    for model, state in states:
        static.append(Term(f"{model.role} weights", state.weights))
        if state.optimizer:
            static.append(Term(f"{model.role} AdamW state", state.optimizer))
    if dist.data_parallel_wrapper:
        buckets = sum(s.grads for m, s in states if m.prepared)
        if buckets:
            static.append(Term("DDP gradient buckets", buckets))
    if dist.strategy == "zero3":
        static += _zero3_terms(models, precision, dist)
    return states, static


def _deepspeed_bytes(model: HeldModel, precision: Precision) -> int:
    """Bytes of an element of DeepSpeed's weights and gradient buffers: 16-bit under mixed precision."""
    return precision.compute if precision.autocast != "no" else model.dtype_bytes


def _zero3_terms(models: list[HeldModel], precision: Precision, dist: Distribution) -> list[Term]:
    """ZeRO-3's own buffers: the reduce bucket of the engine that trains (one: a stage's trained models are prepared
    as one module), and the small parameters it keeps whole on every device (stage3_param_persistence_threshold)
    instead of sharded."""
    terms = []
    trained = next((m for m in models if m.prepared and m.trained), None)
    if trained is not None and dist.zero.contiguous_gradients:
        elements = dist.zero.reduce_bucket(trained.shape.n_embd)
        terms.append(Term(f"DeepSpeed reduce bucket ({elements:.3g} elements)",
                          elements * _deepspeed_bytes(trained, precision)))
    for model in models:
        if not model.prepared:
            continue
        c = _deepspeed_bytes(model, precision)
        threshold = dist.zero.persistence(model.shape.n_embd)
        persistent = sum(size * count for size, count in model.shape.parameter_sizes() if size < threshold)
        if persistent and dist.processes > 1:
            terms.append(Term(f"{model.role} parameters under {threshold:.3g} elements, kept whole (ZeRO-3)",
                              math.ceil(persistent * c * (1 - 1 / dist.ways("weights")))))
    return terms


def zero12_bucket_bytes(model: HeldModel, precision: Precision, dist: Distribution) -> int:
    """ZeRO-1/2's reduce buckets, allocated for each backward: reduce_bucket_size elements, twice with overlap_comm
    (see ZeroSettings)."""
    if dist.strategy not in ("zero1", "zero2") or not model.trained or not dist.zero.contiguous_gradients:
        return 0
    stage = int(dist.strategy[-1])
    buffers = 2 if dist.zero.overlapping(stage) else 1
    return buffers * dist.zero.reduce_bucket(model.shape.n_embd) * _deepspeed_bytes(model, precision)


def _training_phases(trained: list[tuple[HeldModel, ModelState, int]], extra_forward: list[Term],
                     accumulation: int, precision: Precision, dist: Distribution) -> list[Phase]:
    """forward/backward and optimizer step, for models trained together. `trained`: (model, state, saved bytes of
    its activations and loss head)."""
    grads = sum(state.grads for _, state, _ in trained)
    terms = []
    for model, state, saved in trained:
        terms.append(Term(f"{model.role} activations and output head", saved))
        copy = autocast_copy_bytes(model, precision, dist)
        if copy:
            terms.append(Term(f"{model.role} 16-bit weight copy (autocast)", copy))
        gathered = gathered_bytes(model, precision, dist)
        if gathered:
            terms.append(Term(f"{model.role} weights gathered to compute ({dist.strategy})", gathered))
        if accumulation == 1 and model.trains == "all":
            # backward begins at the output head, whose gradient (the tied embedding: V x d) comes first
            head = model.shape.vocab_size * model.shape.n_embd if model.head == "lm" else model.shape.n_embd
            terms.append(Term(f"{model.role} output-head gradient",
                              math.ceil(head * state.grads / model.trainable_parameters)))
    buckets = zero12_bucket_bytes(trained[0][0], precision, dist)  # one engine: the trained models are one module
    if buckets:
        count = "2 x " if dist.zero.overlapping(int(dist.strategy[-1])) else ""
        terms.append(Term(f"DeepSpeed reduce bucket ({count}{dist.zero.reduce_bucket(trained[0][0].shape.n_embd):.3g} "
                          f"elements{', overlap_comm' if count else ''})", buckets))
    if accumulation > 1 and grads:
        terms.append(Term(f"gradients (accumulated over {accumulation} micro-batches)", grads))
    terms += extra_forward
    step = [Term("gradients", grads)]
    for model, state, _ in trained:
        if model.trains == "all" and model.head == "lm" and model.shape.tied:
            # the tied embedding: its gradient is added into the output head's at the end of backward
            step.append(Term(f"{model.role} embedding gradient, added into the tied output head's",
                             math.ceil(model.shape.vocab_size * model.shape.n_embd * state.grads /
                                       model.trainable_parameters)))
    return [Phase("forward/backward", terms), Phase("optimizer step", step)]


@dataclass(frozen=True)
class TrlSpec:
    """A TRL / Trainer stage's memory-relevant settings (pretrain, sft, reward, dpo)."""

    stage: str
    model: HeldModel
    precision: Precision
    micro_batch: int
    accumulation: int
    length: int
    head: str  # loss_head_bytes kind
    sequences_per_example: int = 1  # reward and DPO: chosen and rejected
    checkpointing: bool = False
    padded: bool = True
    reference: HeldModel | None = None  # DPO
    scorers: tuple[HeldModel, ...] = ()  # DPO: reward / gold models of the held-out generation evaluation
    eval_batch: int | None = None
    generation: tuple[int, int, int] | None = None  # DPO evaluation: (prompts per batch, prompt tokens, response)
    loss_positions: int | None = None  # the most positions of a sequence with a loss (completions), when known


def trl_memory(spec: TrlSpec, dist: Distribution) -> MemoryPlan:
    p, model = spec.precision, spec.model
    models = [model] + ([spec.reference] if spec.reference else []) + list(spec.scorers)
    states, static = _static_terms(models, p, dist)
    rows = spec.micro_batch * spec.sequences_per_example
    checkpointing = spec.checkpointing or dist.activation_checkpointing
    a = activation_precision(p, dist)
    saved = block_activation_bytes(model, rows, spec.length, a, dist=dist, checkpointing=checkpointing,
                                   padded=spec.padded) + backward_working_bytes(model, rows, spec.length, a)
    head_positions = rows * (spec.length - 1 if spec.head == "trl-fused" else spec.length)
    if spec.head == "trl-fused" and dist.device == "gpu" and spec.loss_positions:
        head_positions = rows * min(spec.loss_positions, spec.length - 1)  # with Triton only they are scored
    saved += loss_head_bytes(spec.head, head_positions, model.shape.vocab_size, a, dist)
    extra = []
    if spec.reference is not None:  # DPO: the reference's forward runs while the policy's activations are held
        extra.append(Term("reference forward (no grad)",
                          no_grad_forward_bytes(spec.reference, rows, spec.length, p) +
                          gathered_bytes(spec.reference, p, dist) +
                          loss_head_bytes("trl-fused", head_positions, model.shape.vocab_size, p, dist,
                                          backward=False)))
    phases = _training_phases([(model, states[0][1], saved)], extra, spec.accumulation, p, dist)
    if spec.eval_batch:
        eval_rows = spec.eval_batch * spec.sequences_per_example
        head = loss_head_bytes(spec.head, eval_rows * spec.length, model.shape.vocab_size, p, dist, backward=False)
        phases.append(Phase("evaluation", [Term(f"forward of {eval_rows} rows (no grad)",
                                                no_grad_forward_bytes(model, eval_rows, spec.length, p) + head)]))
    if spec.generation:
        prompts, prompt_len, response = spec.generation
        # sharded weights (FSDP, ZeRO-3) are held whole for the generation evaluation (ppo.modules.gathered)
        sharded = [m for m in (model, spec.reference) if m is not None and m.prepared]
        whole = ([Term("policy and reference weights gathered whole", sum(whole_bytes(m, p) for m in sharded))]
                 if dist.ways("weights") > 1 and sharded else None)
        phases.append(_generation_phase("evaluation (sampling)", model, prompts, prompt_len, response, p, dist,
                                        whole))
    notes = []
    if checkpointing:
        notes.append("activations: gradient checkpointing on (each block recomputed in backward: +1 forward)")
    return MemoryPlan(states, static, phases, p, dist, notes)


def _generation_phase(name: str, policy: HeldModel, rows: int, prompt: int, response: int, p: Precision,
                      dist: Distribution, whole: list[Term] | None = None) -> Phase:
    """Sampling `response` tokens for `rows` prompts: the KV cache, the prefill's transients, the logits of a step;
    with sharded weights, those gathered (`whole`: the trained models held whole, as PPO does under FSDP)."""
    length = prompt + response
    gathered = whole if whole is not None and whole else (
        [Term("weights gathered to sample", gathered_bytes(policy, p, dist))] if gathered_bytes(policy, p, dist)
        else [])
    return Phase(name, [
        Term(f"KV cache ({rows} x {length} tokens)", kv_cache_bytes(policy.shape, rows, length, p, prompt)),
        Term(f"prefill ({rows} x {prompt} prompt tokens)", no_grad_forward_bytes(policy, rows, prompt, p)),
        Term("sampling logits", rows * policy.shape.vocab_size * 4 * 4),
        *gathered,
    ])


@dataclass(frozen=True)
class PpoSpec:
    """PPO's memory-relevant settings, per process."""

    policy: HeldModel
    precision: Precision
    rollouts: int  # episodes sampled at once on one process (the local rollout batch)
    micro_batch: int
    accumulation: int
    prompt: int  # prompt tokens (left-padded to the longest)
    response: int
    forward_batch: int  # rows per no-grad scoring pass
    eval_batch: int
    reference: HeldModel | None = None  # None: the LoRA policy with its adapter disabled
    reward: HeldModel | None = None  # None: a reward function
    gold: HeldModel | None = None
    value: HeldModel | None = None  # a separate value model
    value_mode: str = "shared"  # "shared", "separate" or "none"
    checkpointing: bool = False


def ppo_memory(spec: PpoSpec, dist: Distribution) -> MemoryPlan:
    p, policy = spec.precision, spec.policy
    frozen = [m for m in (spec.reference, spec.reward, spec.gold) if m is not None]
    trained = [policy] + ([spec.value] if spec.value is not None else [])
    states, static = _static_terms(trained + frozen, p, dist)
    length, response, vocab = spec.prompt + spec.response, spec.response, policy.shape.vocab_size
    checkpointing = spec.checkpointing or dist.activation_checkpointing

    a = activation_precision(p, dist)

    def saved(model: HeldModel) -> int:
        head = loss_head_bytes("ppo-lm" if model.head == "lm" else "score", spec.micro_batch * response, vocab, a,
                               dist)
        return (block_activation_bytes(model, spec.micro_batch, length, a, dist=dist, checkpointing=checkpointing,
                                       train_dropout=False) + backward_working_bytes(model, spec.micro_batch, length, a)
                + head)

    # under FSDP our PPO gathers the trained models whole for generation, scoring and evaluation (whole_weights)
    whole = [Term("trained weights gathered whole (FSDP)", sum(whole_bytes(m, p) for m in trained))] if dist.fsdp \
        else []
    phases = [_generation_phase("generation", policy, spec.rollouts, spec.prompt, response, p, dist, whole)]
    chunk = min(spec.forward_batch, spec.rollouts)
    logits = chunk * response * vocab
    scoring = [Term(f"logits of policy and reference, {chunk} rows x {response} tokens, and entropy temporaries",
                    logits * (2 * p.compute + 16)),
               Term(f"trunk forward ({chunk} x {length} tokens)", no_grad_forward_bytes(policy, chunk, length, p)),
               *whole]
    if spec.reference is not None and gathered_bytes(spec.reference, p, dist):
        scoring.append(Term("reference weights gathered to compute", gathered_bytes(spec.reference, p, dist)))
    scorer_rows = min(REWARD_SCORING_BATCH, spec.rollouts)
    reward_pass = max((no_grad_forward_bytes(m, scorer_rows, length + 1, p) + gathered_bytes(m, p, dist)
                       for m in (spec.reward, spec.gold) if m is not None), default=0)
    phases.append(Phase("scoring", scoring))
    if reward_pass:
        phases.append(Phase("reward model", [Term(f"forward of {scorer_rows} x {length + 1} tokens (no grad)",
                                                   reward_pass)]))
    phases += _training_phases([(m, s, saved(m)) for m, s in states if m in trained], [], spec.accumulation, p,
                               dist)
    rows = min(spec.eval_batch, max(spec.eval_batch, 1))
    # ... and the frozen models too for the evaluation, whose processes may hold different numbers of prompts
    frozen_whole = sum(gathered_bytes(m, p, dist) for m in frozen)
    evaluation = _generation_phase("evaluation", policy, rows, spec.prompt, response, p, dist,
                                   whole + ([Term("reference, reward and gold weights gathered whole (FSDP)",
                                                  frozen_whole)] if dist.fsdp and frozen_whole else []))
    evaluation.terms.append(Term(f"log-probabilities, {LOGPROB_CHUNK} rows at a time",
                                 loss_head_bytes("ppo-lm", min(LOGPROB_CHUNK, rows) * response, vocab, p, dist,
                                                 backward=False)))
    phases.append(evaluation)
    notes = []
    if dist.fsdp:
        notes.append("under FSDP our PPO shards the reference, reward and gold models (each one unit, as trl's "
                     "prepare_fsdp does), gathers each whole while it computes, and gathers the trained models whole "
                     "for generation, scoring and evaluation")
    if checkpointing:
        notes.append("activations: gradient checkpointing on (each block recomputed in backward: +1 forward)")
    return MemoryPlan(states, static, phases, p, dist, notes)


# ---------------------------------------------------------------------------------------------------------------
# FLOPs (multiply-adds x 2), all through ModelShape.forward_flops
# ---------------------------------------------------------------------------------------------------------------
def forward_flops(shape: ModelShape, rows: int, length: int, head: str = "lm", head_positions: int | None = None,
                  attended: float | None = None) -> float:
    """One forward pass over `rows` sequences of `length` tokens (causal: each attends (length + 1) / 2 keys on
    average), the head ("lm", "score" or "none") applied at `head_positions` positions per row (default all)."""
    attended = (length + 1) / 2 if attended is None else attended
    trunk = shape.forward_flops(rows * length, attended, "none")
    positions = rows * (length if head_positions is None else head_positions)
    return trunk + shape.forward_flops(positions, 0, head) - shape.forward_flops(positions, 0, "none")


def training_passes(lora: bool, checkpointing: bool) -> int:
    """Forward-pass equivalents of a training step: forward + backward (2x: gradients of activations and of
    weights) = 3; LoRA's frozen weights need no weight gradients: 2; gradient checkpointing adds a forward."""
    return (2 if lora else 3) + (1 if checkpointing else 0)


def generation_flops(shape: ModelShape, rows: int, prompt: int, response: int) -> float:
    """Sampling `response` tokens after `prompt` with a KV cache: a prefill over the prompt (logits at its last
    position only), then one token per step attending to everything before it."""
    prefill = forward_flops(shape, rows, prompt, "lm", head_positions=1)
    steps = response - 1
    if steps <= 0:
        return prefill
    return prefill + forward_flops(shape, rows * steps, 1, "lm", attended=prompt + 1 + steps / 2)


def ppo_update_flops(spec: PpoSpec, rollout_batch: int, ppo_epochs: int, lora: bool) -> dict[str, float]:
    """FLOPs of one PPO update, all processes together: generation, scoring (policy + reference forwards over
    prompt + response, the reward model's, the value model's) and training (ppo_epochs x a training step of the
    policy, and of a separate value model, on every episode)."""
    shape, n, length = spec.policy.shape, rollout_batch, spec.prompt + spec.response
    generation = generation_flops(shape, n, spec.prompt, spec.response)
    policy_forward = forward_flops(shape, n, length, "lm", head_positions=spec.response)
    scoring = 2 * policy_forward  # policy (old log-probs, values when shared) and reference
    for model in (spec.reward, spec.gold):
        if model is not None:
            scoring += forward_flops(model.shape, n, length + 1, "score")
    value_forward = 0.0
    if spec.value is not None:
        value_forward = forward_flops(spec.value.shape, n, length, "score", head_positions=spec.response)
        scoring += value_forward
    passes = training_passes(lora, spec.checkpointing)
    training = ppo_epochs * passes * (policy_forward + value_forward)
    return {"generation": generation, "scoring": scoring, "training": training}


def trl_step_flops(spec: TrlSpec, examples: int, lora: bool) -> float:
    """FLOPs of one optimizer step of a TRL / Trainer stage: `examples` examples (all processes), each
    `sequences_per_example` sequences; DPO adds the reference's forward."""
    rows = examples * spec.sequences_per_example
    forward = forward_flops(spec.model.shape, rows, spec.length, spec.model.head)
    flops = training_passes(lora, spec.checkpointing) * forward
    if spec.reference is not None:
        flops += forward_flops(spec.reference.shape, rows, spec.length, "lm")
    return flops


def trl_steps(rows: int, micro_batch: int, processes: int, accumulation: int, epochs: float) -> int:
    """Optimizer steps of a Trainer over `rows` examples: batches per epoch (the last one partial), optimizer steps
    per epoch (the last one partial), times the epochs (rounded up), as transformers' Trainer counts them."""
    batches = math.ceil(rows / (micro_batch * processes))
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(epochs * per_epoch)
