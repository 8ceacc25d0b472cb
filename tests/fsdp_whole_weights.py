"""One process of tests/test_distributed.py's FSDP2 check (torchrun, gloo, CPU): `ppo.modules.whole_weights` makes a
fully_shard-ed policy generate and save exactly as the unsharded one, and leaves it sharded and trainable after."""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_pipeline.models import save_model  # noqa: E402
from rlhf_pipeline.ppo.modules import PolicyAndValue, policy_state_dict, whole_weights  # noqa: E402


def main(out: Path) -> None:
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    policy = GPT2LMHeadModel(config).eval()  # no dropout: the two generations must match token for token
    unsharded = copy.deepcopy(policy)
    model = PolicyAndValue(policy, None, critic=True)
    for block in policy.transformer.h:
        fully_shard(block)
    fully_shard(model)
    assert isinstance(policy.transformer.wte.weight, DTensor)

    prompts = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with whole_weights(model):
        generated = policy.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    expected = unsharded.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    assert torch.equal(generated, expected), "generation differs"

    # the save: the full state dict gathered by every process (as accelerator.get_state_dict does under FSDP2),
    # written by process 0 (as the PPO stage does: `policy_state_dict`)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_model(policy, None, out, None, state_dict=policy_state_dict(full))
        saved = load_file(out / "model.safetensors")
        weights = unsharded.state_dict()
        assert saved.keys() <= weights.keys() and "transformer.wte.weight" in saved
        assert all(torch.equal(saved[k], weights[k]) for k in saved), "saved weights differ"
    dist.barrier()

    # after the block: sharded again, and the wrapped model trains
    assert isinstance(policy.transformer.wte.weight, DTensor)
    mask = torch.ones_like(generated)
    logits, values = model(generated, mask, prompts.shape[1])
    (logits.float().mean() + values.float().mean()).backward()
    print(f"rank {dist.get_rank()}: ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
