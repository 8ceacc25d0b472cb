"""The rlhf CLI, run in one process of a torchrun launch, recording what this process did for
tests/test_distributed.py: every Trainer's data and steps, the first batch it trained on, a digest of the trained
weights when each stage ends (on every process, before the main one saves), and every run file it wrote. The record
goes to $RLHF_PROBE_DIR/rank-<RANK>.json when the command returns.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_probe.py pipeline RECIPE
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

RANK = int(os.environ.get("RANK", "0"))
RECORD: dict = {"rank": RANK, "trainers": {}, "weights": {}, "wrote": []}


def digest(model) -> str:
    """Bit-exact fingerprint of a model's parameters and buffers (gathered whole when sharded: every process calls
    it)."""
    from torch.distributed.tensor import DTensor

    hasher = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return hasher.hexdigest()


def install() -> None:
    import transformers

    from rlhf_pipeline import runs
    from rlhf_pipeline.ppo import trainer as ppo_trainer
    from rlhf_pipeline.stages import common

    def stage_of(output_dir) -> str:
        return Path(output_dir).name.removesuffix(".staging")

    original_train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        result = original_train(self, *args, **kwargs)
        RECORD["trainers"][stage_of(self.args.output_dir)] = {
            "rows": len(self.train_dataset), "per_device_batch": self.args.per_device_train_batch_size,
            "world_size": self.args.world_size, "steps": self.state.global_step, "epochs": self.args.num_train_epochs,
            "engine": str(self.accelerator.distributed_type),
            "first_batch": RECORD.pop("_first_batch", None)}
        return result

    original_step = transformers.Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        if "_first_batch" not in RECORD:  # the token ids of the batch (each trainer names them its own way)
            ids = next(value for key, value in sorted(inputs.items()) if key.endswith("input_ids"))
            RECORD["_first_batch"] = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
        return original_step(self, model, inputs, *args, **kwargs)

    original_save_trained = common.save_trained

    def save_trained(trainer, loaded, *args, **kwargs):
        RECORD["weights"][loaded.stage] = digest(trainer.accelerator.unwrap_model(trainer.model))
        return original_save_trained(trainer, loaded, *args, **kwargs)

    original_ppo_train = ppo_trainer.PPOTrainer.train

    def ppo_train(self, *args, **kwargs):
        state = original_ppo_train(self, *args, **kwargs)
        RECORD["weights"]["ppo"] = digest(self.accelerator.unwrap_model(self.model))
        RECORD["trainers"]["ppo"] = {"episodes": state.episodes, "optimizer_steps": state.optimizer_steps,
                                     "local_rollout_batch_size": self.plan.local_rollout_batch_size}
        return state

    def recording(function, what):
        def wrapper(*args, **kwargs):
            RECORD["wrote"].append([what, str(args[0]) if args else ""])
            return function(*args, **kwargs)
        return wrapper

    runs.atomic_write_text = recording(runs.atomic_write_text, "atomic_write_text")
    runs.start_run = recording(runs.start_run, "start_run")
    runs.finish_run = recording(runs.finish_run, "finish_run")
    original_save_pretrained = transformers.PreTrainedModel.save_pretrained

    def save_pretrained(self, directory, *args, **kwargs):
        RECORD["wrote"].append(["save_pretrained", str(directory)])
        return original_save_pretrained(self, directory, *args, **kwargs)

    transformers.PreTrainedModel.save_pretrained = save_pretrained
    transformers.Trainer.train = train
    transformers.Trainer.training_step = training_step
    common.save_trained = save_trained  # before any stage module imports it
    ppo_trainer.PPOTrainer.train = ppo_train


def dump() -> None:
    RECORD.pop("_first_batch", None)
    if os.environ.get("RLHF_PROBE_DIR"):
        Path(os.environ["RLHF_PROBE_DIR"], f"rank-{RANK}.json").write_text(json.dumps(RECORD, indent=1))


def main() -> None:
    install()
    from rlhf_pipeline.cli import main as rlhf

    sys.argv = ["rlhf", *sys.argv[1:]]
    try:
        rlhf()
    finally:  # before the interpreter's own teardown, which a launcher may cut short (see TEARDOWN_ABORT)
        dump()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
