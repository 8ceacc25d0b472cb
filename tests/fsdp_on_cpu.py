"""The rlhf CLI under Accelerate's FSDP on a machine without GPUs, for tests/test_distributed.py.

Accelerate selects FSDP only for GPU-like backends (`AcceleratorState`: MULTI_GPU, MULTI_XPU, ...; never MULTI_CPU),
and `rlhf` refuses an FSDP launch without GPUs for that reason. torch's FSDP2 (`fully_shard`) itself runs on CPU over
gloo. This shim changes Accelerate's device selection (and lifts rlhf's refusal, which exists because of it) and
nothing else: the launched processes are told they are "GPU" processes whose device is the CPU and whose backend is
gloo, so that Accelerate chooses FSDP as it would on GPUs. Everything after that is the real code: Accelerate's FSDP2
preparation (`fsdp2_prepare_model`, the optimizer rebuilt on the sharded parameters), torch's `fully_shard`, the
gathered full state dict a run saves, Accelerate's `save_state` / `load_state` of the sharded weights and optimizer,
TRL's `prepare_fsdp`, the Trainer's FSDP support, and our PPO loop. What it cannot show is what only GPUs have:
NCCL, GPU kernels, one device per process.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 --mixed_precision no \\
        tests/fsdp_on_cpu.py ppo RECIPE

The CLI runs under tests/distributed_probe.py, which records what each process did in $RLHF_PROBE_DIR when set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def install() -> None:
    import torch
    from accelerate import state
    from accelerate.utils import DistributedType

    from rlhf_pipeline.stages import common

    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with an FSDP config"
    assert not torch.accelerator.is_available(), "on a machine with GPUs, launch rlhf itself"

    original_init = state.PartialState.__init__

    def init(self, cpu: bool = False, **kwargs):
        original_init(self, cpu=False, **kwargs)  # `cpu` routes a launch to MULTI_CPU, where FSDP is never chosen

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return backend or "gloo", DistributedType.MULTI_GPU  # what a GPU launch finds; gloo carries the traffic

    original_set_device = state.PartialState.set_device

    def set_device(self):
        if self.device is None and self.distributed_type in (DistributedType.MULTI_GPU, DistributedType.FSDP):
            self.device = torch.device("cpu")
        original_set_device(self)

    state.PartialState.__init__ = init
    state.PartialState._prepare_backend = prepare_backend
    state.PartialState.set_device = set_device

    # rlhf refuses FSDP without GPUs because Accelerate would not select it; under this shim it does
    original_refusals = common.engine_refusals

    def engine_refusals(loaded, engine, zero, fsdp_version, gpu, deepspeed_cpu=False):
        return original_refusals(loaded, engine, zero, fsdp_version, True, deepspeed_cpu)

    common.engine_refusals = engine_refusals


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install()
    import distributed_probe

    distributed_probe.main()
