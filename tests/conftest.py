"""Shared fixtures: tiny tokenizers, models and data built locally (no network), and CLI helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

# Offline before anything imports huggingface_hub, datasets or transformers: they read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

# datasets and transformers attach their log handlers to the stderr that exists when they are first imported: import
# them here, not inside a CliRunner call that swaps stderr (later log lines would print "--- Logging error ---").
import datasets  # noqa: E402, F401
import pytest  # noqa: E402
import transformers  # noqa: E402, F401
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HH_RLHF = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"

# Trainer settings that keep stage tests to a few seconds on a CPU.
FAST_TRAINING = {
    "max_steps": 3,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "learning_rate": 1.0e-3,
    "logging_steps": 1,
    "bf16": False,
    "activation_checkpointing": False,
    "disable_tqdm": True,
}


@pytest.fixture(autouse=True)
def _run_from_repo_root(monkeypatch):
    """Recipes name paths relative to the current directory, as users run them from the repository root."""
    monkeypatch.chdir(REPO)


# A torchrun worker on CPU (gloo) now and then aborts as its interpreter exits, after its work is done and written:
# "terminate called without an active exception", a C++ thread left joinable at exit. Seen in about 1 of 16
# launches of a pure-torch FSDP2 script, with or without DeepSpeed installed, and once in an `rlhf sft` launch under
# ZeRO-3. A launch whose only failure is that abort counts as having run; each test then
# checks every result the run was to write.
TEARDOWN_ABORT = "terminate called without an active exception"


def launch_ran(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == 0 or TEARDOWN_ABORT in done.stderr


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under a directory and its bytes: equal snapshots mean nothing was touched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def weights(path: Path) -> dict:
    """The tensors of a saved model's model.safetensors."""
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def hold_lock(path: Path):
    """Another process holding a run dir's lock, as a running stage does (a subprocess.Popen: kill it when done)."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom rlhf_pipeline import runs\nwith runs.lock(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def interrupt(mode: str, at: int, *args: str) -> subprocess.CompletedProcess:
    """`rlhf ARGS...` in a subprocess stopped at a known point (tests/interrupt_at.py: kill -9 after a checkpoint,
    Ctrl-C in a step, kill -9 before a swap)."""
    import sys

    import torch

    # the threads of this process: a different count sums in another order, and bit-for-bit comparisons would fail
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([sys.executable, str(REPO / "tests" / "interrupt_at.py"), mode, str(at), *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_cli(*args: str):
    """Invoke the Typer app in-process (CliRunner); returns the click Result."""
    from typer.testing import CliRunner

    from rlhf_pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_world() -> dict[str, list[dict]]:
    from rlhf_pipeline.tiny.world import generate

    return generate(seed=1, n_corpus=600, n_sft=64, n_pairs=64, n_pairs_test=16, n_prompts=64, n_prompts_test=16)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tiny_world) -> Path:
    """Small data files in every format the stages read."""
    root = tmp_path_factory.mktemp("data")
    write_jsonl(root / "text.jsonl", tiny_world["corpus"])
    write_jsonl(root / "sft.jsonl", tiny_world["sft"])
    write_jsonl(root / "prefs.jsonl", tiny_world["preferences-train"])
    write_jsonl(root / "prefs-test.jsonl", tiny_world["preferences-test"])
    write_jsonl(root / "prompts.jsonl", tiny_world["prompts-train"])
    write_jsonl(root / "prompts-test.jsonl", tiny_world["prompts-test"])
    write_jsonl(root / "chat.jsonl", [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in tiny_world["sft"]
    ])
    # implicit prompt: whole texts that share their prefix, as in Anthropic HH-RLHF
    write_jsonl(root / "prefs-implicit.jsonl", [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in tiny_world["preferences-train"]
    ])
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_world) -> Path:
    """A 2-layer, 32-wide GPT-2 with a 400-token BPE vocabulary (GPT-2's conventions: `<|endoftext|>` is EOS, BOS
    and pad), saved like a pre-training output."""
    import torch

    from rlhf_pipeline.models import init_gpt2, train_bpe_tokenizer
    from rlhf_pipeline.recipe.schema import BpeTraining, GPT2Architecture

    root = tmp_path_factory.mktemp("tiny-model")
    texts = [r["text"] for r in tiny_world["corpus"]]
    tokenizer = train_bpe_tokenizer([texts], BpeTraining(vocab_size=400))
    torch.manual_seed(0)  # the same weights whichever test builds the fixture first
    model = init_gpt2(GPT2Architecture(n_layer=2, n_head=2, n_embd=32, n_positions=64), tokenizer)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def stage_recipe(stage: str, output_dir: Path, model: Path | str, data: dict, **extra: Any) -> dict[str, Any]:
    recipe = {"stage": stage, "seed": 0, "output_dir": str(output_dir), "model": {"name_or_path": str(model)},
              "data": data, "training": dict(FAST_TRAINING)}
    recipe.update(extra)
    return recipe


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A one-output sequence classifier on the tiny model (random score head), saved like a reward-stage output."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny-reward")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)  # the score head's random start
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def ppo_recipe(output_dir: Path, policy: Path, reward: dict, data_dir: Path, **training: Any) -> dict[str, Any]:
    """A PPO recipe small enough for a test: 2 updates of 8 episodes, 2 epochs x 2 mini-batches x 2 micro-batches."""
    settings = {"total_episodes": 16, "rollout_batch_size": 8, "num_mini_batches": 2, "ppo_epochs": 2,
                "gradient_accumulation_steps": 2, "learning_rate": 1.0e-3, "eval_prompts": 8, "eval_batch_size": 4,
                "sample_every": 1, "num_samples": 2}
    settings.update(training)
    return {
        "stage": "ppo", "seed": 0, "output_dir": str(output_dir),
        "policy": {"name_or_path": str(policy)},
        "reward": reward,
        "gold": {"function": "rlhf_pipeline.tiny.annotator:gold_score"},
        "data": {"files": {"train": str(data_dir / "prompts.jsonl"), "test": str(data_dir / "prompts-test.jsonl")},
                 "eval_split": "test"},
        "generation": {"response_length": 8},
        "training": settings,
    }


TINY_ARCH = {"n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 128}


def write_pipeline_recipes(root: Path, data_dir: Path, training: dict[str, Any], ppo_episodes: int) -> Path:
    """Stage recipes (pretrain, sft, reward, ppo) and a pipeline recipe over copies of the tiny data files, in
    root/recipes (they name each other relatively); the pipeline writes under root/runs. Returns root."""
    folder = root / "recipes"
    data = {name: str(shutil.copy(data_dir / name, root / name)) for name in
            ("text.jsonl", "sft.jsonl", "prefs.jsonl", "prefs-test.jsonl", "prompts.jsonl", "prompts-test.jsonl")}
    write_recipe(folder / "pretrain.yaml", {
        "stage": "pretrain", "output_dir": "unused", "model": {"init": TINY_ARCH},
        "tokenizer": {"train": {"vocab_size": 400}}, "data": {"files": data["text.jsonl"], "eval_size": 16,
                                                              "block_size": 32}, "training": training})
    write_recipe(folder / "sft.yaml", {
        "stage": "sft", "output_dir": "unused", "model": {"name_or_path": "unused"},
        "data": {"files": data["sft.jsonl"], "eval_size": 8}, "training": training})
    write_recipe(folder / "reward.yaml", {
        "stage": "reward", "output_dir": "unused", "model": {"name_or_path": "unused"},
        "data": {"files": {"train": data["prefs.jsonl"], "test": data["prefs-test.jsonl"]}, "eval_split": "test"},
        "training": training})
    write_recipe(folder / "ppo.yaml", ppo_recipe(Path("unused"), Path("unused"), {"model": "unused"}, root,
                                                 total_episodes=ppo_episodes, gradient_accumulation_steps=1))
    write_recipe(folder / "pipeline.yaml", {
        "stage": "pipeline", "output_dir": str(root / "runs"),
        "stages": {"pretrain": {"recipe": "pretrain.yaml"}, "sft": {"recipe": "sft.yaml"},
                   "reward": {"recipe": "reward.yaml"}, "ppo": {"recipe": "ppo.yaml"}, "eval": {}},
        "gate": {"min_reward_accuracy": 0.0},
    })
    return root


# ---------------------------------------------------------------------------------------------------------------
# the stand-in Hub (tests/hub_server.py)
# ---------------------------------------------------------------------------------------------------------------
TOKEN = "hf_TeStToKeN_do_not_leak_8d3f1a"


def _use_hub(monkeypatch, server=None, cache: Path | None = None) -> None:
    """Point huggingface_hub at the stand-in: HF_ENDPOINT is read when huggingface_hub is imported, so the
    module constants it was copied into are patched too; the tests' conftest sets HF_HUB_OFFLINE=1. Downloads
    (`hf_hub_download`, `ModelCard.load`) go to `cache`, never the user's own."""
    from huggingface_hub import constants

    if server is not None:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
    if cache is not None:
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # the stand-in has LFS but no Xet storage: with hf_xet installed, LFS-mode files would go to Xet
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, accepting only TOKEN; *.safetensors go through the LFS batch API, as on the real Hub."""
    from hub_server import HubServer

    with HubServer(token=TOKEN, lfs_patterns=("*.safetensors",)) as server:
        _use_hub(monkeypatch, server, cache=tmp_path / "hf-cache")
        yield server
