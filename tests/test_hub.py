"""Pushing run dirs to the Hub: against a stand-in Hub server on 127.0.0.1 (tests/hub_server.py), offline."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import (
    FAST_TRAINING,
    REPO,
    TOKEN,
    _use_hub,
    run_cli,
    stage_recipe,
    write_pipeline_recipes,
    write_recipe,
)
from hub_server import HubServer
from huggingface_hub import ModelCard

from rlhf_pipeline import runs as runs_io
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.hub import push_if_configured, push_run, skip_reason
from rlhf_pipeline.model_card import model_card

PPO_REPO = "rlhf-test/tiny-ppo"
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"

MODEL_FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja"]
REPORT_FILES = ["recipe.resolved.yaml", "metrics.json", "eval.json", "log.jsonl", "ppo_curves.png", "notes/report.md"]
SAMPLE_FILES = ["eval_samples.jsonl", "samples.jsonl"]  # uploaded only on request
NEVER_UPLOADED = ["training_args.bin", "rng_state.pth", "scaler.pt", "extra.pkl",
                  "checkpoints/update-000001/model.safetensors", "checkpoints/update-000001/optimizer.pt",
                  "runs/events.out.tfevents.1.host", ".hidden.json",
                  ".metrics.json.x1y2.tmp", "notes.txt~", "README.md"]


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _provenance() -> dict:
    return {"created": "2026-01-01T00:00:00+00:00", "command": "rlhf ppo recipes/tiny/ppo.yaml", "python": "3.11.7",
            "platform": "Linux", "versions": {"rlhf-pipeline": "0.1.0", "transformers": "5.24.0", "trl": "1.16.0",
                                              "huggingface_hub": "2.4.0"},
            "git": {"commit": GIT_COMMIT, "dirty": False}}


def _finished_run(path: Path, recipe: dict, metrics: dict, weights: bool = True) -> Path:
    """A run dir as a stage leaves it: model + tokenizer, recipe.resolved.yaml (with provenance), metrics.json last."""
    path.mkdir(parents=True, exist_ok=True)
    if weights:
        import torch
        from safetensors.torch import save_file

        save_file({"transformer.wte.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
                   "score.weight": torch.ones(1, 3)}, str(path / "model.safetensors"))
        _write(path / "config.json", json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 3, "n_positions": 16,
                                                 "vocab_size": 4}))
        _write(path / "generation_config.json", json.dumps({"eos_token_id": 0}))
        _write(path / "tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}}}))
        _write(path / "tokenizer_config.json", json.dumps({"eos_token": "<|endoftext|>"}))
        _write(path / "chat_template.jinja", "{% for m in messages %}{{ m.content }}{% endfor %}")
    _write(path / "recipe.resolved.yaml", yaml.safe_dump({**recipe, "provenance": _provenance()}, sort_keys=False))
    _write(path / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return path


@pytest.fixture
def upstream(tmp_path) -> dict[str, Path]:
    """An SFT run that was pushed (it has hub.json) and a reward run that was not."""
    sft = _finished_run(tmp_path / "upstream" / "sft", {"stage": "sft", "output_dir": "runs/x/sft",
                                                        "model": {"name_or_path": "gpt2"}},
                        {"train_loss": 1.0}, weights=False)
    _write(sft / "hub.json", json.dumps({"repo_id": "rlhf-test/tiny-sft", "url": "https://elsewhere.example/x",
                                         "commit_sha": "feedface" * 5, "revision": "main",
                                         "pushed_at": "2026-01-01T00:00:00+00:00"}))
    reward = _finished_run(tmp_path / "upstream" / "reward", {"stage": "reward", "output_dir": "runs/x/reward",
                                                              "model": {"name_or_path": str(sft)}},
                           {"eval_accuracy": 0.9}, weights=False)
    return {"sft": sft, "reward": reward}


@pytest.fixture
def ppo_run(tmp_path, upstream) -> Path:
    """A finished PPO run dir, with everything a push must leave out beside what it must upload."""
    recipe = {
        "stage": "ppo", "seed": 0, "output_dir": "runs/x/ppo",
        "policy": {"name_or_path": str(upstream["sft"]), "revision": None},
        "tokenizer": {"name_or_path": None, "revision": None, "chat_template": None},
        "reference": {"name_or_path": None},
        "reward": {"model": str(upstream["reward"]), "function": None},
        "value": {"mode": "shared", "name_or_path": None},
        "gold": {"model": None, "function": "rlhf_pipeline.tiny.annotator:gold_score"},
        "data": {"dataset": None, "files": {"train": ["data/prompts.jsonl"], "test": ["data/prompts-test.jsonl"]},
                 "train_split": "train", "eval_split": "test"},
        "generation": {"response_length": 8, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
        "training": {"total_episodes": 16, "learning_rate": 0.001},
        "peft": None,
    }
    metrics = {"eval_score_before": 0.43723064661026, "eval_score_after": 3.300278663635254, "eval_kl": 4.0298,
               "episodes": 16, "saved": "full", "final_policy_loss": -0.003920549992471933}
    run = _finished_run(tmp_path / "ppo", recipe, metrics)
    _write(run / "eval.json", json.dumps({"win_rate": 0.8125, "judge": {"agreement": 0.75}, "rows": [1, 2]}))
    _write(run / "log.jsonl", json.dumps({"train/update": 1, "objective/score": 0.5}) + "\n")
    _write(run / "samples.jsonl", json.dumps({"update": 1, "prompt": "p", "response": "r", "score": 0.1}) + "\n")
    eval_rows = [
        {"phase": "before", "prompt": "review of <Film|One>:", "response": " dull *very*\nslow", "score": -1.25},
        {"phase": "before", "prompt": "second prompt", "response": " meh", "score": 0.5},
        {"phase": "after", "prompt": "review of <Film|One>:", "response": " a joy<|endoftext|>", "score": 3.5},
        {"phase": "after", "prompt": "second prompt", "response": " great", "score": 2.75},
    ]
    _write(run / "eval_samples.jsonl", "".join(json.dumps(r) + "\n" for r in eval_rows))
    _write(run / "ppo_curves.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    _write(run / "notes" / "report.md", "# notes\n")
    for name in NEVER_UPLOADED:
        _write(run / name, b"\x80\x04pickled or otherwise unwanted")
    return run


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _front_matter(card: str) -> dict:
    """The card's metadata as huggingface_hub reads it (its model-index too)."""
    assert card.startswith("---\n")
    return ModelCard(card).data.to_dict()


def _hub_card(repo_id: str) -> ModelCard:
    """The repo's model card as a user reads it: `ModelCard.load`, which downloads README.md from the (stand-in)
    Hub with `hf_hub_download` and parses its metadata."""
    return ModelCard.load(repo_id)


def _results(meta: dict) -> list:
    """The card's model-index, as huggingface_hub's EvalResult objects."""
    from huggingface_hub import ModelCardData

    return ModelCardData(**meta).eval_results or []


# ---------------------------------------------------------------------------------------------------------------
# pushing
# ---------------------------------------------------------------------------------------------------------------
def test_push_uploads_the_run_and_its_card(hub, ppo_run, upstream):
    before = _snapshot(ppo_run)
    result = push_run(ppo_run, PPO_REPO)

    uploaded = hub.uploaded(PPO_REPO)
    assert set(uploaded) == {".gitattributes", "README.md", *MODEL_FILES, *REPORT_FILES}
    for name in MODEL_FILES + REPORT_FILES:
        if name != "recipe.resolved.yaml":  # the recipe as published (see the tests of what stays local)
            assert uploaded[name] == (ppo_run / name).read_bytes(), name
    # the weights went through the LFS batch API and arrive intact
    assert any(method == "PUT" and path.startswith("/__lfs/") for method, path in hub.requests)
    from safetensors.torch import load

    assert load(uploaded["model.safetensors"])["transformer.wte.weight"].sum().item() == 66.0

    repo = hub.repos[PPO_REPO]
    assert repo.private is True and hub.created[0]["visibility"] == "private"
    assert result.repo_id == PPO_REPO
    assert result.url == f"{hub.url}/{PPO_REPO}"
    assert result.commit_sha == repo.branches["main"]
    assert sorted(result.files) == sorted(["README.md", *MODEL_FILES, *REPORT_FILES])
    assert {"training_args.bin", "checkpoints/", "runs/", "README.md", ".hidden.json"} <= set(result.skipped)
    # samples only on request
    for name in SAMPLE_FILES:
        assert "--include-samples" in result.skipped[name]

    # the run dir is untouched but for hub.json, which records the push (and no token)
    after = _snapshot(ppo_run)
    record = json.loads(after.pop("hub.json"))
    assert after == before
    assert set(record) == {"repo_id", "url", "commit_sha", "revision", "pushed_at"}
    assert record["repo_id"] == PPO_REPO and record["url"] == f"{hub.url}/{PPO_REPO}"
    assert record["commit_sha"] == result.commit_sha and record["revision"] == "main"

    # the card is the generated one, not the run dir's README.md
    card = uploaded["README.md"].decode()
    assert card == model_card(ppo_run, repo_id=PPO_REPO, endpoint=hub.url, quoted=SAMPLE_FILES)


def test_the_token_goes_only_into_the_authorization_header(hub, ppo_run, upstream):
    push_run(ppo_run, PPO_REPO)
    needle = TOKEN.encode()
    api_calls = [auth for (method, path), auth in zip(hub.requests, hub.authorizations) if path.startswith("/api/")
                 and path != "/api/agent-harnesses"]
    assert api_calls and all(auth == f"Bearer {TOKEN}" for auth in api_calls)
    assert all(needle not in body for body in hub.bodies)
    assert all(needle not in content for content in hub.uploaded(PPO_REPO).values())
    for root in (ppo_run, *upstream.values()):
        for name, content in _snapshot(root).items():
            assert needle not in content, f"{root / name} holds the token"

    # downloading: the Hub gets the token, the CDN an LFS file is redirected to does not
    from huggingface_hub import hf_hub_download

    weights = Path(hf_hub_download(PPO_REPO, "model.safetensors"))
    assert weights.read_bytes() == (ppo_run / "model.safetensors").read_bytes()
    downloads = [(method, path, auth) for (method, path), auth in zip(hub.requests, hub.authorizations)
                 if "/resolve/" in path or (method == "GET" and path.startswith("/__lfs/"))]
    assert [(method, auth) for method, _, auth in downloads] == [("HEAD", f"Bearer {TOKEN}"), ("GET", None)]


def test_the_card_describes_the_run(hub, ppo_run, upstream):
    push_run(ppo_run, PPO_REPO)
    card = hub.uploaded(PPO_REPO)["README.md"].decode()
    assert str(_hub_card(PPO_REPO)) == card  # what a user downloads, and it parses back to itself

    meta = _hub_card(PPO_REPO).data.to_dict()
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["rlhf-pipeline", "rlhf", "ppo"]  # our PPO trainer, not TRL's
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["base_model"] == "rlhf-test/tiny-sft"  # the policy, pushed before
    assert meta["base_model_relation"] == "finetune"
    assert "license" not in meta and "datasets" not in meta  # none given; local files only
    assert "model-index" not in meta  # the held-out data are local files: no Hub dataset to name

    # metrics (rounded) and the evaluation report
    assert "| eval_score_after | 3.3 |" in card
    assert "| eval_score_before | 0.4372 |" in card
    assert "| final_policy_loss | -0.003921 |" in card
    assert "| episodes | 16 |" in card
    assert "| win_rate | 0.8125 |" in card and "| judge.agreement | 0.75 |" in card
    assert "the card's metadata holds no results" in card

    # lineage: the pushed SFT run links to its repo on the endpoint in use; the reward run was not pushed, and is
    # told by its stage and where it came from, never by its path
    assert f"[rlhf-test/tiny-sft]({hub.url}/rlhf-test/tiny-sft), pushed from a local sft run" in card
    reward_line = next(line for line in card.splitlines() if line.startswith("- **reward model:**"))
    assert reward_line == ("- **reward model:** a local reward run (not pushed), trained from "
                           f"[rlhf-test/tiny-sft]({hub.url}/rlhf-test/tiny-sft)")
    assert "rlhf_pipeline.tiny.annotator:gold_score" in card
    assert "- **data:** local files (train: `prompts.jsonl`; test: `prompts-test.jsonl`), not published" in card
    assert str(upstream["reward"].parent) not in card and "data/prompts.jsonl" not in card

    # how to load it, and sample as PPO did: every generation setting, top_k=0 too
    assert f'AutoModelForCausalLM.from_pretrained("{PPO_REPO}")' in card
    assert ("model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)"
            in card)

    # no sample is quoted; the card says which files stay with the run
    assert "review of <Film|One>:" not in card and "second prompt" not in card
    assert "Not published: `eval_samples.jsonl`, `samples.jsonl` quote prompts of the data" in card

    # the method's papers, and how to cite them
    assert "[arXiv:1707.06347](https://arxiv.org/abs/1707.06347)" in card
    assert "[arXiv:2203.02155](https://arxiv.org/abs/2203.02155)" in card
    assert "@article{schulman2017proximal," in card and "@inproceedings{ouyang2022training," in card

    # the recipe as published, and its provenance
    assert f"```yaml\n{hub.uploaded(PPO_REPO)['recipe.resolved.yaml'].decode().rstrip()}\n```" in card
    assert GIT_COMMIT in card
    assert "| transformers | 5.24.0 |" in card


def test_the_card_quotes_samples_when_they_are_published(hub, ppo_run, upstream):
    result = push_run(ppo_run, PPO_REPO, include_samples=True)
    uploaded = hub.uploaded(PPO_REPO)
    assert {"samples.jsonl", "eval_samples.jsonl"} <= set(uploaded) and not set(SAMPLE_FILES) & set(result.skipped)
    card = uploaded["README.md"].decode()
    assert "Published with this card, as asked" in card and "`eval_samples.jsonl`, `samples.jsonl`" in card
    assert "published, but the samples published with this card quote prompts from them" in card

    # samples: before/after side by side, as JSON in a code block (which Markdown shows as written)
    block = card.split("## Samples", 1)[1].split("```json\n", 1)[1].split("\n```", 1)[0]
    pairs = json.loads(block)
    assert pairs[0] == {"prompt": "review of <Film|One>:", "before": {"response": " dull *very*\nslow", "score": -1.25},
                        "after": {"response": " a joy<|endoftext|>", "score": 3.5}}
    assert [p["prompt"] for p in pairs] == ["review of <Film|One>:", "second prompt"]
    assert 'inputs = tokenizer("review of <Film|One>:", return_tensors="pt")' in card


def test_a_second_push_to_the_same_repo(monkeypatch, tmp_path, ppo_run, upstream):
    """create_repo(exist_ok=True): the repo exists the second time; only changed files make a new commit."""
    from huggingface_hub import HfApi

    with HubServer(token=TOKEN) as server:  # every file as a regular (base64) commit operation
        _use_hub(monkeypatch, server, cache=tmp_path / "hf-cache")
        first = push_run(ppo_run, PPO_REPO, private=False)
        assert _hub_card(PPO_REPO).data.license is None
        assert server.repos[PPO_REPO].private is False

        # unchanged: nothing to commit, the head stays
        again = push_run(ppo_run, PPO_REPO)
        assert again.commit_sha == first.commit_sha
        assert [c.get("visibility") for c in server.created] == ["public", "private"]
        assert server.repos[PPO_REPO].private is False  # an existing repo keeps its visibility

        # changed: a new commit with the new content; the card read back from the Hub is the new one
        _write(ppo_run / "eval.json", json.dumps({"win_rate": 0.9}))
        third = push_run(ppo_run, PPO_REPO, commit_message="Re-evaluate", license="mit")
        assert third.commit_sha != first.commit_sha
        assert server.uploaded(PPO_REPO)["eval.json"] == b'{"win_rate": 0.9}'
        card = _hub_card(PPO_REPO)
        assert card.data.license == "mit" and "| win_rate | 0.9 |" in card.text
        assert server.repos[PPO_REPO].commits[-1]["summary"] == "Re-evaluate"
        assert json.loads((ppo_run / "hub.json").read_text())["commit_sha"] == third.commit_sha

        # the client itself, as push_run uses it
        api = HfApi()
        url = api.create_repo(PPO_REPO, exist_ok=True)
        assert str(url) == f"{server.url}/{PPO_REPO}"
        assert api.model_info(PPO_REPO).sha == third.commit_sha


def test_push_to_a_branch(hub, ppo_run):
    result = push_run(ppo_run, PPO_REPO, revision="experiment-1")
    assert result.revision == "experiment-1"
    assert "README.md" in hub.uploaded(PPO_REPO, "experiment-1")
    assert set(hub.uploaded(PPO_REPO, "main")) == {".gitattributes"}
    assert json.loads((ppo_run / "hub.json").read_text())["revision"] == "experiment-1"


def test_downstream_card_links_to_a_run_pushed_earlier(hub, tmp_path):
    """The hub.json that push_run writes is what the next stage's card links to."""
    sft = _finished_run(tmp_path / "sft", {"stage": "sft", "output_dir": "x", "model": {"name_or_path": "gpt2"},
                                           "data": {"dataset": "org/demos", "subset": "default"}}, {"train_loss": 1.5})
    push_run(sft, "rlhf-test/sft")
    reward = _finished_run(tmp_path / "reward", {"stage": "reward", "output_dir": "y",
                                                 "model": {"name_or_path": str(sft)}}, {"eval_accuracy": 0.75})
    push_run(reward, "rlhf-test/reward")
    card = _hub_card("rlhf-test/reward")
    assert (card.data.base_model, card.data.pipeline_tag) == ("rlhf-test/sft", "text-classification")
    assert f"({hub.url}/rlhf-test/sft)" in card.text
    assert hub.repos["rlhf-test/sft"].branches["main"][:12] in card.text  # the commit it came from
    sft_card = _hub_card("rlhf-test/sft")
    assert (sft_card.data.base_model, sft_card.data.datasets) == ("gpt2", ["org/demos"])
    assert f"({hub.url}/gpt2)" in sft_card.text and f"({hub.url}/datasets/org/demos)" in sft_card.text


# ---------------------------------------------------------------------------------------------------------------
# refusals: nothing is sent, nothing is written
# ---------------------------------------------------------------------------------------------------------------
def _refused(hub: HubServer, run: Path, match: str, **kwargs) -> UserError:
    before = _snapshot(run)
    with pytest.raises(UserError, match=match) as info:
        push_run(run, kwargs.pop("repo_id", PPO_REPO), **kwargs)
    assert hub.requests == [] and hub.repos == {}
    assert _snapshot(run) == before
    assert TOKEN not in str(info.value)
    return info.value


def test_refuses_an_unfinished_run(hub, ppo_run):
    (ppo_run / "metrics.json").unlink()
    error = _refused(hub, ppo_run, "no metrics.json")
    assert "only finished runs are pushed" in str(error)


def test_refuses_a_directory_that_is_not_a_run(hub, tmp_path):
    _write(tmp_path / "other" / "file.txt", "x")
    _refused(hub, tmp_path / "other", "not an rlhf run dir")


@pytest.mark.parametrize("repo_id", ["tiny-ppo", "org/team/tiny-ppo", "org/", "/tiny", "org/bad..name",
                                     "org/with space", "org/-dash-first"])
def test_refuses_a_malformed_repo_id(hub, ppo_run, repo_id):
    _refused(hub, ppo_run, "invalid repo id", repo_id=repo_id)


def test_refuses_without_a_token(hub, ppo_run, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    _refused(hub, ppo_run, r"set HF_TOKEN or run `hf auth login`")


def test_refuses_in_offline_mode(hub, ppo_run, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _refused(hub, ppo_run, "HF_HUB_OFFLINE")


def test_refuses_a_file_that_holds_the_token(hub, ppo_run):
    _write(ppo_run / "log.jsonl", json.dumps({"note": f"token={TOKEN}"}) + "\n")
    error = _refused(hub, ppo_run, "contains your Hub token")
    assert "log.jsonl" in str(error)


def test_a_rejected_token_is_a_user_error(monkeypatch, ppo_run):
    with HubServer(token="hf_the_right_one") as server:
        _use_hub(monkeypatch, server)
        with pytest.raises(UserError, match="rejected the token") as info:
            push_run(ppo_run, PPO_REPO)
        assert TOKEN not in str(info.value)
        assert server.repos == {} and not (ppo_run / "hub.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# the `hub:` recipe section
# ---------------------------------------------------------------------------------------------------------------
def test_push_if_configured(hub, ppo_run, capsys):
    section = SimpleNamespace(repo_id=PPO_REPO, push=False, private=True, revision=None)
    assert push_if_configured(ppo_run, None) is None
    assert push_if_configured(ppo_run, section) is None
    assert hub.requests == []

    with pytest.raises(UserError, match="hub.repo_id is not set"):
        push_if_configured(ppo_run, SimpleNamespace(repo_id=None, push=True, private=True, revision=None))

    section.push = True
    result = push_if_configured(ppo_run, section)
    assert result is not None and hub.repos[PPO_REPO].private is True
    assert f"pushed {ppo_run} to {hub.url}/{PPO_REPO}" in capsys.readouterr().err


def test_a_failed_push_at_the_end_of_a_stage_says_how_to_retry(monkeypatch, ppo_run):
    with HubServer(token="hf_the_right_one") as server:
        _use_hub(monkeypatch, server)
        section = SimpleNamespace(repo_id=PPO_REPO, push=True, private=True, revision=None)
        with pytest.raises(UserError, match=rf"run itself finished; push it again with `rlhf push {ppo_run}"):
            push_if_configured(ppo_run, section)


# ---------------------------------------------------------------------------------------------------------------
# the card, without pushing
# ---------------------------------------------------------------------------------------------------------------
def test_card_of_a_lora_adapter_reward_model(tmp_path):
    run = _finished_run(tmp_path / "reward", {"stage": "reward", "output_dir": "x",
                                              "model": {"name_or_path": "openai-community/gpt2", "revision": "main"},
                                              "data": {"dataset": "Anthropic/hh-rlhf", "data_dir": "harmless-base"}},
                        {"eval_accuracy": 0.6875, "saved": "adapter"}, weights=False)
    _write(run / "adapter_config.json", json.dumps({"base_model_name_or_path": "runs/tiny/sft", "r": 8,
                                                    "lora_alpha": 16, "peft_type": "LORA"}))
    _write(run / "adapter_model.safetensors", b"")
    card = model_card(run, repo_id="org/rm", endpoint="https://hub.example")
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and "reward" in meta["tags"]
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == "openai-community/gpt2" and meta["datasets"] == ["Anthropic/hh-rlhf"]
    assert meta["base_model_relation"] == "adapter"
    assert 'AutoPeftModelForSequenceClassification.from_pretrained("org/rm")' in card
    assert "[openai-community/gpt2](https://hub.example/openai-community/gpt2)" in card
    assert "(https://hub.example/datasets/Anthropic/hh-rlhf) on the Hub (data dir `harmless-base`)" in card
    assert "| eval_accuracy | 0.6875 |" in card


def test_card_of_a_pretraining_run_from_scratch(tmp_path):
    recipe = {"stage": "pretrain", "output_dir": "x",
              "model": {"name_or_path": None, "init": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                                      "n_positions": 64}},
              "tokenizer": {"name_or_path": None, "train": {"vocab_size": 400}},
              "data": {"files": {"train": "corpus.jsonl"}}}
    run = _finished_run(tmp_path / "pretrain", recipe, {"eval_loss": 2.5, "num_parameters": 932608})
    card = model_card(run, endpoint="https://hub.example")
    meta = _front_matter(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # nothing it derives from
    assert meta["pipeline_tag"] == "text-generation"
    assert "initialised from scratch" in card and "byte-level BPE" in card
    assert "- **data:** local files (train: `corpus.jsonl`), not published" in card
    assert "layers 2, width 3, context 16, vocabulary 4" in card  # from config.json; the Hub counts parameters
    assert _results(meta) == [] and "| eval_loss | 2.5 |" in card  # local data: no model-index
    assert meta["tags"] == ["rlhf-pipeline", "transformers", "pretrain"]  # transformers' Trainer made it
    assert "## Method" not in card
    assert f'AutoModelForCausalLM.from_pretrained("{run}")' in card


def test_card_of_a_run_on_a_dataset_mixture(tmp_path):
    """TRL's `datasets:` shape: every Hub entry goes into the metadata, local files and builders do not."""
    mixture = [{"path": "trl-lib/Capybara", "split": "train[:10%]", "fraction": 0.75},
               {"path": "json", "data_files": "own.jsonl", "split": "train", "fraction": 0.25},
               {"data_files": ["more.jsonl"], "split": "train"}]
    run = _finished_run(tmp_path / "sft", {"stage": "sft", "output_dir": "x",
                                           "model": {"name_or_path": "openai-community/gpt2"},
                                           "data": {"datasets": mixture}}, {"eval_loss": 2.0})
    card = model_card(run, repo_id="org/sft", endpoint="https://hub.example")
    assert _front_matter(card)["datasets"] == ["trl-lib/Capybara"]
    assert ("a mixture of [trl-lib/Capybara](https://hub.example/datasets/trl-lib/Capybara) on the Hub (split "
            "`train[:10%]`, fraction `0.75`); local files `own.jsonl` (split `train`, fraction `0.25`); local files "
            "`more.jsonl` (split `train`)") in card


@pytest.mark.parametrize("estimator, says", [("gae", "optimised with PPO"), ("rloo", "optimised with RLOO"),
                                             ("grpo", "optimised with GRPO")])
def test_card_names_the_policy_optimisation_method(tmp_path, estimator, says):
    recipe = {"stage": "ppo", "output_dir": "x", "policy": {"name_or_path": "runs/sft"},
              "reward": {"model": "runs/reward"}, "training": {"advantage_estimator": estimator}}
    card = model_card(_finished_run(tmp_path / estimator, recipe, {"eval_score_after": 1.0}),
                      endpoint="https://hub.example")
    assert f"This is a policy {says}" in card


def test_importing_the_module_stays_light():
    code = ("import sys, rlhf_pipeline.hub, rlhf_pipeline.model_card; heavy = [m for m in ('torch', 'transformers', "
            "'huggingface_hub', 'jinja2') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_selection_rules():
    assert skip_reason("optimizer.pt").startswith("pickle") and skip_reason("Model.PTH").startswith("pickle")
    assert skip_reason("pytorch_model.bin").startswith("pickle")
    assert skip_reason("merges.txt") is None and skip_reason("tokenizer.model") is None
    assert skip_reason("checkpoint-500") == "training checkpoints"
    assert skip_reason("wandb") == "experiment-tracker logs"
    assert skip_reason("readme.md") == "replaced by the generated model card"


def test_card_code_blocks_hold_backticks(tmp_path):
    """Whatever a prompt, a sample or the recipe holds, it stays inside its code block: the fence is longer."""
    run = _finished_run(tmp_path / "sft", {"stage": "sft", "output_dir": "x", "model": {"name_or_path": "gpt2"},
                                           "note": "a ```` b"}, {"eval_loss": 1.0})
    _write(run / "samples.jsonl", json.dumps({"prompt": "say ``` now", "response": "`x`"}) + "\n")
    card = model_card(run, endpoint="https://hub.example", include_samples=True)
    assert "`````yaml\n" in card and "````json\n" in card and "````python\n" in card
    assert 'inputs = tokenizer("say ``` now", return_tensors="pt")' in card
    assert "say ``` now" not in model_card(run, endpoint="https://hub.example")  # samples not published


def test_card_of_a_run_without_weights(tmp_path):
    """An evaluation run holds reports only: no loading snippet, no library or pipeline metadata."""
    run = _finished_run(tmp_path / "eval", {"stage": "eval", "output_dir": "x"}, {"win_rate": 0.5}, weights=False)
    _write(run / "eval.json", json.dumps({"win_rate": 0.5}))
    card = model_card(run, endpoint="https://hub.example")
    meta = _front_matter(card)
    assert "library_name" not in meta and "pipeline_tag" not in meta and "eval" in meta["tags"]
    assert "## How to use" not in card and "| win_rate | 0.5 |" in card


# ---------------------------------------------------------------------------------------------------------------
# the card's metadata, as the Hub reads it
# ---------------------------------------------------------------------------------------------------------------
def test_the_pushed_card_metadata_field_by_field(hub, tmp_path):
    recipe = {"stage": "sft", "output_dir": "x", "model": {"name_or_path": "gpt2"},
              "data": {"dataset": "org/demos", "subset": "default", "revision": "v1", "eval_split": "test"}}
    run = _finished_run(tmp_path / "sft", recipe, {"train_loss": 1.5, "eval_loss": 2.0, "eval_perplexity": 7.389,
                                                   "eval_pairs_too_long": 0, "saved": "full"})
    push_run(run, "rlhf-test/sft", license="mit")
    data = _hub_card("rlhf-test/sft").data

    assert data.base_model == "gpt2" and data.base_model_relation == "finetune"
    assert data.datasets == ["org/demos"] and data.license == "mit"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"trl", "rlhf-pipeline", "sft"} <= set(data.tags)
    # the held-out numbers (not the training loss, not counts) are the model-index the Hub shows
    assert data.model_name == "rlhf-test/sft"
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("eval_loss", 2.0),
                                                                            ("eval_perplexity", 7.389)]
    for result in data.eval_results:
        assert (result.task_type, result.dataset_type, result.dataset_name) == ("text-generation", "org/demos",
                                                                                 "org/demos")
        assert (result.dataset_config, result.dataset_split, result.dataset_revision) == ("default", "test", "v1")
    assert "model-index" in data.to_dict()


def test_the_ppo_card_model_index(hub, tmp_path):
    """The model-index holds this model's own held-out results after training, on the Hub dataset they were measured
    on; the figures from before training and the counts are in the text only."""
    recipe = {"stage": "ppo", "output_dir": "x", "policy": {"name_or_path": "gpt2"}, "reward": {"model": "org/rm"},
              "data": {"dataset": "org/prompts", "eval_split": "test"},
              "generation": {"response_length": 8, "temperature": 0.7, "top_k": 0, "top_p": 1.0}}
    metrics = {"eval_score_before": 0.43723064661026, "eval_score_after": 3.300278663635254, "eval_kl": 4.0298,
               "eval_kl_before": 0.0, "eval_gold_before": 0.1, "eval_gold_after": 0.5, "eval_prompts": 64,
               "eval_prompts_too_long": 0, "episodes": 16}
    run = _finished_run(tmp_path / "ppo", recipe, metrics)
    _write(run / "eval.json", json.dumps({"win_rate": 0.8125}))  # a comparison: the text reports it
    push_run(run, PPO_REPO)
    card = _hub_card(PPO_REPO)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "eval_score_after": 3.300278663635254, "eval_kl": 4.0298, "eval_gold_after": 0.5}
    assert {(r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) for r in card.data.eval_results} == {
        ("text-generation", "org/prompts", "org/prompts", "test")}
    assert card.data.datasets == ["org/prompts"] and card.data.base_model == "gpt2"
    for row in ("| eval_score_before | 0.4372 |", "| eval_kl_before | 0 |", "| eval_prompts | 64 |",
                "| win_rate | 0.8125 |"):
        assert row in card.text
    assert "figures from before training and counts are in the tables only" in card.text


# ---------------------------------------------------------------------------------------------------------------
# a push makes the repo mirror the run
# ---------------------------------------------------------------------------------------------------------------
def _adapter_run(path: Path, base: str) -> Path:
    """A finished SFT run saved as a LoRA adapter on `base` (as PEFT writes it: base_model_name_or_path)."""
    run = _finished_run(path, {"stage": "sft", "output_dir": "x", "model": {"name_or_path": base},
                               "peft": {"r": 4, "save": "adapter"}}, {"eval_loss": 3.0, "saved": "adapter"},
                        weights=False)
    _write(run / "adapter_config.json", json.dumps({"base_model_name_or_path": base, "revision": None, "r": 4,
                                                    "lora_alpha": 8, "peft_type": "LORA"}, indent=2))
    _write(run / "adapter_model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _write(run / "tokenizer.json", json.dumps({"version": "1.0"}))
    _write(run / "notes" / "report.md", "# notes\n")
    return run


def test_a_push_deletes_what_the_run_no_longer_has(hub, tmp_path):
    merged = _finished_run(tmp_path / "merged", {"stage": "sft", "output_dir": "x", "model": {"name_or_path": "gpt2"}},
                           {"eval_loss": 2.0, "saved": "merged"})
    push_run(merged, "rlhf-test/sft")
    assert "model.safetensors" in hub.uploaded("rlhf-test/sft")

    adapter = _adapter_run(tmp_path / "adapter", "gpt2")
    commits = len(hub.repos["rlhf-test/sft"].commits)
    result = push_run(adapter, "rlhf-test/sft")
    files = hub.uploaded("rlhf-test/sft")
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors",
                          "tokenizer.json", "recipe.resolved.yaml", "metrics.json", "notes/report.md"}
    assert result.deleted == sorted(["model.safetensors", "config.json", "generation_config.json",
                                     "tokenizer_config.json", "chat_template.jinja"])
    assert len(hub.repos["rlhf-test/sft"].commits) == commits + 1  # uploads and deletions in one commit
    assert _hub_card("rlhf-test/sft").data.base_model_relation == "adapter"

    # a file deleted from the run disappears from the repo; the pickles and checkpoints it holds never arrive
    (adapter / "notes" / "report.md").unlink()
    _write(adapter / "checkpoints" / "step-1" / "adapter_model.safetensors", b"x")
    _write(adapter / "optimizer.pt", b"x")
    again = push_run(adapter, "rlhf-test/sft")
    assert again.deleted == ["notes/report.md"]
    assert set(hub.uploaded("rlhf-test/sft")) == set(files) - {"notes/report.md"}


def test_a_branch_mirrors_the_run_and_main_keeps_its_files(hub, tmp_path):
    merged = _finished_run(tmp_path / "merged", {"stage": "sft", "output_dir": "x", "model": {"name_or_path": "gpt2"}},
                           {"eval_loss": 2.0})
    push_run(merged, "rlhf-test/sft")
    push_run(_adapter_run(tmp_path / "adapter", "gpt2"), "rlhf-test/sft", revision="lora")
    assert "model.safetensors" not in hub.uploaded("rlhf-test/sft", "lora")
    assert "model.safetensors" in hub.uploaded("rlhf-test/sft", "main")


# ---------------------------------------------------------------------------------------------------------------
# an adapter's base, named by repo id in the pushed copy
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("branch", [None, "exp"])
def test_an_adapter_on_a_pushed_base_names_the_base_repo(hub, tmp_path, branch):
    base = _finished_run(tmp_path / "base", {"stage": "pretrain", "output_dir": "x",
                                             "model": {"init": {"n_layer": 2}}}, {"eval_loss": 4.0})
    push_run(base, "rlhf-test/base", revision=branch)
    adapter = _adapter_run(tmp_path / "adapter", str(base.resolve()))
    local = (adapter / "adapter_config.json").read_bytes()

    push_run(adapter, "rlhf-test/adapter")
    pushed = json.loads(hub.uploaded("rlhf-test/adapter")["adapter_config.json"])
    assert pushed["base_model_name_or_path"] == "rlhf-test/base"
    assert pushed["revision"] == branch  # PEFT loads the base from this branch; None: main
    assert pushed["r"] == 4 and pushed["peft_type"] == "LORA"
    assert (adapter / "adapter_config.json").read_bytes() == local  # the run dir keeps its own
    data = _hub_card("rlhf-test/adapter").data
    assert (data.base_model, data.base_model_relation, data.library_name) == ("rlhf-test/base", "adapter", "peft")


def test_an_adapter_on_a_hub_model_is_pushed_as_it_is(hub, tmp_path):
    adapter = _adapter_run(tmp_path / "adapter", "gpt2")
    push_run(adapter, "rlhf-test/adapter")
    assert hub.uploaded("rlhf-test/adapter")["adapter_config.json"] == (adapter / "adapter_config.json").read_bytes()


def test_an_adapter_on_a_local_base_that_was_not_pushed_is_refused(hub, tmp_path):
    base = _finished_run(tmp_path / "base", {"stage": "sft", "output_dir": "x"}, {"eval_loss": 4.0}, weights=False)
    adapter = _adapter_run(tmp_path / "adapter", str(base))
    error = _refused(hub, adapter, "names its base model by a local path", repo_id="rlhf-test/adapter")
    assert f"rlhf push {base} --repo-id" in str(error) and "--base-repo-id ORG/NAME" in str(error)

    result = run_cli("push", adapter, "--repo-id", "rlhf-test/adapter")
    assert result.exit_code == 2 and "--base-repo-id" in result.output and "Traceback" not in result.output
    result = run_cli("push", adapter, "--repo-id", "rlhf-test/adapter", "--base-repo-id", "not a repo")
    assert result.exit_code == 2 and "invalid base repo id 'not a repo'" in result.output
    assert hub.repos == {}


def test_base_repo_id_names_the_base(hub, tmp_path):
    adapter = _adapter_run(tmp_path / "adapter", str(tmp_path / "gone" / "base"))  # trained elsewhere, say
    local = (adapter / "adapter_config.json").read_bytes()
    result = run_cli("push", adapter, "--repo-id", "rlhf-test/adapter", "--base-repo-id", "rlhf-test/base",
                     "--license", "apache-2.0")
    assert result.exit_code == 0, result.output
    files = hub.uploaded("rlhf-test/adapter")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "rlhf-test/base"
    assert (adapter / "adapter_config.json").read_bytes() == local
    data = _hub_card("rlhf-test/adapter").data
    assert (data.base_model, data.license) == ("rlhf-test/base", "apache-2.0")
    assert "rlhf-test/base" in files["README.md"].decode().split("## How to use", 1)[1]


def test_base_repo_id_names_the_base_of_a_full_model(hub, ppo_run):
    push_run(ppo_run, PPO_REPO, base_repo_id="rlhf-test/other-sft")
    data = _hub_card(PPO_REPO).data
    assert (data.base_model, data.base_model_relation) == ("rlhf-test/other-sft", "finetune")


# ---------------------------------------------------------------------------------------------------------------
# --push-to-hub on a training command
# ---------------------------------------------------------------------------------------------------------------
def _tiny_sft_recipe(tmp_path: Path, model: Path, data_dir: Path) -> Path:
    training = {**FAST_TRAINING, "max_steps": 1}
    return write_recipe(tmp_path / "sft.yaml", stage_recipe("sft", tmp_path / "out", model,
                                                            {"files": str(data_dir / "sft.jsonl"), "eval_size": 8},
                                                            training=training))


def test_push_to_hub_pushes_the_finished_run(hub, tmp_path, tiny_model_dir, data_dir):
    recipe = _tiny_sft_recipe(tmp_path, tiny_model_dir, data_dir)
    result = run_cli("sft", recipe, "--push-to-hub", "rlhf-test/cli-sft")
    assert result.exit_code == 0, result.output
    files = hub.uploaded("rlhf-test/cli-sft")
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json", "recipe.resolved.yaml",
            "README.md", "log.jsonl", "sft_curves.png"} <= set(files)  # the history: numbers only, it goes along
    assert hub.repos["rlhf-test/cli-sft"].private is True
    record = json.loads((tmp_path / "out" / "hub.json").read_text())
    assert record["repo_id"] == "rlhf-test/cli-sft"
    assert "sft" in _hub_card("rlhf-test/cli-sft").data.tags


def test_push_to_hub_checks_the_repo_id_before_training(hub, tmp_path, tiny_model_dir, data_dir):
    recipe = _tiny_sft_recipe(tmp_path, tiny_model_dir, data_dir)
    result = run_cli("sft", recipe, "--push-to-hub", "no-namespace")
    assert result.exit_code == 2, result.output
    assert "invalid --push-to-hub repo id 'no-namespace'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and hub.requests == []

    result = run_cli("sft", recipe, "--push-to-hub", "rlhf-test/cli-sft", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "push to rlhf-test/cli-sft" in result.output and hub.requests == []


# ---------------------------------------------------------------------------------------------------------------
# nothing local leaves the machine: real runs, made under a folder whose name must not be published
# ---------------------------------------------------------------------------------------------------------------
SECRET = "alice-acme-secret"  # in the folders above every run
HOST, USER, PLATFORM = "alice-acme-host", "alice-acme-user", "Linux-alice-acme-platform-x86_64"


@pytest.fixture(scope="module")
def made_runs(tmp_path_factory, data_dir) -> dict[str, Path]:
    """The tiny pipeline (pretrain, sft, reward, ppo, eval) and a DPO LoRA adapter on its SFT model, run in this
    process under `<tmp>/alice-acme-secret/...` by a user whose home, user name, host name and platform carry the
    same marks, from recipes named by absolute path."""
    import getpass
    import platform
    import socket

    root = tmp_path_factory.mktemp("hub-runs") / SECRET / "projects" / "rlhf"
    root.mkdir(parents=True)
    write_pipeline_recipes(root, data_dir, dict(FAST_TRAINING), ppo_episodes=8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(root.parent.parent / "home" / USER))
        patch.setenv("USER", USER)
        patch.setenv("LOGNAME", USER)
        patch.setattr(socket, "gethostname", lambda: HOST)
        patch.setattr(platform, "platform", lambda *args, **kwargs: PLATFORM)
        patch.chdir(root)
        assert getpass.getuser() == USER
        patch.setattr(sys, "argv", ["rlhf", "pipeline", str(root / "recipes" / "pipeline.yaml")])  # as typed
        done = run_cli("pipeline", root / "recipes" / "pipeline.yaml")
        assert done.exit_code == 0, done.output
        runs_dir = root / "runs"
        dpo = stage_recipe("dpo", runs_dir / "dpo", runs_dir / "sft",
                           {"files": {"train": str(root / "prefs.jsonl"), "test": str(root / "prefs-test.jsonl")},
                            "eval_split": "test"},
                           training={**FAST_TRAINING, "max_steps": 2}, reward={"model": str(runs_dir / "reward")},
                           gold={"function": "rlhf_pipeline.tiny.annotator:gold_score"},
                           generation={"response_length": 8}, evaluation={"prompts": 8},
                           peft={"r": 4, "save": "adapter"})
        patch.setattr(sys, "argv", ["rlhf", "dpo", str(root / "recipes" / "dpo.yaml")])
        done = run_cli("dpo", write_recipe(root / "recipes" / "dpo.yaml", dpo))
        assert done.exit_code == 0, done.output
    return {stage: runs_dir / stage for stage in ("pretrain", "sft", "reward", "ppo", "eval", "dpo")}


@pytest.fixture
def real_runs(made_runs) -> dict[str, Path]:
    """The runs as made: no push recorded yet."""
    for run in made_runs.values():
        (run / "hub.json").unlink(missing_ok=True)
    return made_runs


def _markers() -> list[bytes]:
    import platform

    return [m.encode() for m in (SECRET, HOST, USER, PLATFORM, platform.platform())]


def test_pushed_runs_carry_nothing_local(hub, real_runs):
    # the runs themselves keep the whole local record
    ppo = real_runs["ppo"]
    local = yaml.safe_load((ppo / "recipe.resolved.yaml").read_text())
    assert SECRET in local["policy"]["name_or_path"] and SECRET in local["data"]["files"]["train"][0]
    assert local["provenance"]["platform"] == PLATFORM and SECRET in local["provenance"]["command"]
    assert SECRET in (real_runs["dpo"] / "adapter_config.json").read_text()
    assert SECRET in (real_runs["eval"] / "eval.md").read_text()

    # upstream first, so that each card links the runs it came from; samples too, where asked
    for stage in ("pretrain", "sft", "reward", "ppo", "eval", "dpo"):
        push_run(real_runs[stage], f"rlhf-test/{stage}", include_samples=stage in ("ppo", "eval"))

    uploaded = {(repo_id, sha, name): content for repo_id, repo in hub.repos.items()
                for sha, tree in repo.trees.items() for name, content in tree.items()}
    names = {(repo, name) for repo, _, name in uploaded}
    assert {("rlhf-test/ppo", "samples.jsonl"), ("rlhf-test/eval", "eval.md"),
            ("rlhf-test/dpo", "adapter_config.json"), ("rlhf-test/dpo", "adapter_model.safetensors"),
            ("rlhf-test/sft", "tokenizer_config.json"), ("rlhf-test/ppo", "log.jsonl")} <= names
    # every byte of every file in every repo, and of every request (LFS uploads, commit payloads) besides
    for (repo, _, name), content in uploaded.items():
        for marker in _markers():
            assert marker not in content, f"{repo}/{name} holds {marker!r}"
    for body in hub.bodies:
        for marker in _markers():
            assert marker not in body
    # no absolute path at all in the recipes and cards
    for (repo, _, name), content in uploaded.items():
        if name in ("README.md", "recipe.resolved.yaml", "eval.md"):
            assert "/tmp/" not in content.decode() and str(Path.home()) + "/" not in content.decode(), (repo, name)

    # what the paths became: Hub ids of the runs pushed before, local files by name
    ppo_recipe = yaml.safe_load(hub.uploaded("rlhf-test/ppo")["recipe.resolved.yaml"])
    assert ppo_recipe["policy"]["name_or_path"] == "rlhf-test/sft"
    assert ppo_recipe["reward"]["model"] == "rlhf-test/reward"
    assert ppo_recipe["data"]["files"] == {"train": ["local file prompts.jsonl"],
                                           "test": ["local file prompts-test.jsonl"]}
    assert ppo_recipe["output_dir"] == "ppo"
    assert set(ppo_recipe["provenance"]) == {"created", "python", "versions", "git"}
    assert json.loads(hub.uploaded("rlhf-test/dpo")["adapter_config.json"])["base_model_name_or_path"] == \
        "rlhf-test/sft"
    report = hub.uploaded("rlhf-test/eval")["eval.md"].decode()
    assert "Policy `rlhf-test/ppo` against baseline `rlhf-test/sft`" in report
    assert "Reward model `rlhf-test/reward`" in report


def test_a_file_that_names_a_local_path_is_refused(hub, ppo_run):
    _write(ppo_run / "notes" / "report.md", f"made in {ppo_run.parent}/work\n")
    error = _refused(hub, ppo_run, "a local path or platform string")
    assert "report.md" in str(error) and "Remove it from the file" in str(error)


def test_a_file_that_names_the_platform_is_refused(hub, ppo_run):
    import platform

    _write(ppo_run / "log.jsonl", json.dumps({"host": platform.platform()}) + "\n")
    _refused(hub, ppo_run, "log.jsonl holds")


def test_the_recipe_names_local_things_by_what_they_are(hub, tmp_path, upstream):
    """Every kind of local reference a recipe holds, as the pushed copy names it."""
    recipe = {"stage": "sft", "output_dir": str(tmp_path / "runs" / "mine"),
              "model": {"name_or_path": str(upstream["sft"])},
              "tokenizer": {"name_or_path": "gpt2", "chat_template": str(tmp_path / "chat.jinja")},
              "data": {"datasets": [{"path": "json", "data_files": [str(tmp_path / "a.jsonl")]},
                                    {"path": "org/data", "split": "train"},
                                    {"path": str(tmp_path), "split": "train"}]},
              "reward": {"function": str(tmp_path / "score.py") + ":score"},
              "training": {"resume_from_checkpoint": str(tmp_path / "ckpt"), "logging_dir": "~/logs/x"}}
    run = _finished_run(tmp_path / "runs" / "mine", recipe, {"eval_loss": 1.0})
    push_run(run, "rlhf-test/mine")
    published = yaml.safe_load(hub.uploaded("rlhf-test/mine")["recipe.resolved.yaml"])
    assert published["output_dir"] == "mine"
    assert published["model"]["name_or_path"] == "rlhf-test/tiny-sft"
    assert published["tokenizer"] == {"name_or_path": "gpt2", "chat_template": "local file chat.jinja"}
    assert published["data"]["datasets"] == [{"path": "json", "data_files": ["local file a.jsonl"]},
                                             {"path": "org/data", "split": "train"},
                                             {"path": f"local dataset {tmp_path.name}", "split": "train"}]
    assert published["reward"]["function"] == "local file score.py:score"
    assert published["training"] == {"resume_from_checkpoint": "local path ckpt", "logging_dir": "local path x"}
    assert str(tmp_path) not in hub.uploaded("rlhf-test/mine")["README.md"].decode()


def test_relative_paths_mean_what_they_meant_where_the_run_was_made(hub, tmp_path):
    """A run made from its project folder names upstream runs and data relatively (`runs/sft` reads like a Hub id):
    pushed from anywhere else, they still name the local runs and files they named."""
    project = tmp_path / "project"
    _write(project / "data" / "p.jsonl", json.dumps({"prompt": "x"}) + "\n")
    sft = _finished_run(project / "runs" / "sft", {"stage": "sft", "output_dir": "runs/sft",
                                                   "model": {"name_or_path": "gpt2"}}, {"eval_loss": 2.0})
    recipe = {"stage": "ppo", "output_dir": "runs/ppo", "policy": {"name_or_path": "runs/sft"},
              "reward": {"function": "rlhf_pipeline.tiny.annotator:gold_score"},
              "data": {"files": {"train": ["data/p.jsonl"]}}}
    ppo = _finished_run(project / "runs" / "ppo", recipe, {"eval_score_after": 1.0})
    push_run(sft, "rlhf-test/sft")  # from the repository root (the tests' current directory), not the project
    push_run(ppo, PPO_REPO)
    card = _hub_card(PPO_REPO)
    assert card.data.base_model == "rlhf-test/sft"
    assert f"- **policy:** [rlhf-test/sft]({hub.url}/rlhf-test/sft), pushed from a local sft run" in card.text
    published = yaml.safe_load(hub.uploaded(PPO_REPO)["recipe.resolved.yaml"])
    assert published["policy"]["name_or_path"] == "rlhf-test/sft"
    assert published["data"]["files"] == {"train": ["local file p.jsonl"]} and published["output_dir"] == "ppo"


def test_a_local_path_is_found_whole():
    from rlhf_pipeline.publish import find_local

    assert find_local(b'{"dir": "/root"}', ["/root"]) == "/root"
    assert find_local(b"made in /root/x", ["/root"]) == "/root"
    assert find_local(b"/srv/root/x and /rootfs", ["/root"]) is None


# ---------------------------------------------------------------------------------------------------------------
# samples only on request
# ---------------------------------------------------------------------------------------------------------------
def _sample_texts(run: Path) -> set[str]:
    rows = runs_io.read_jsonl(run / "samples.jsonl") + runs_io.read_jsonl(run / "eval_samples.jsonl")
    rows += json.loads((run / "eval_before.json").read_text())["samples"]
    return {row[key] for row in rows for key in ("prompt", "response") if len(row.get(key) or "") > 4}


def test_samples_and_data_stay_with_the_run_unless_asked(hub, real_runs):
    ppo = real_runs["ppo"]
    _write(ppo / "extra" / "rows.jsonl", json.dumps({"text": "a row of the training data"}) + "\n")
    try:
        result = push_run(ppo, "rlhf-test/ppo")
    finally:
        (ppo / "extra" / "rows.jsonl").unlink()
        (ppo / "extra").rmdir()
    files = hub.uploaded("rlhf-test/ppo")
    assert not {"samples.jsonl", "eval_samples.jsonl", "extra/rows.jsonl"} & set(files)
    assert "may hold data rows" in result.skipped["extra/rows.jsonl"]
    before = json.loads(files["eval_before.json"])
    assert "samples" not in before and before["score"] == json.loads((ppo / "eval_before.json").read_text())["score"]
    texts = _sample_texts(ppo)
    assert texts
    for content in files.values():
        assert not any(text.encode() in content for text in texts)
    card = files["README.md"].decode()
    assert "`extra/rows.jsonl`" in card and "the `samples` of `eval_before.json`" in card and "Not published" in card

    # hub.include_samples in the recipe publishes them, as --include-samples does; --no-samples overrides it
    recipe = yaml.safe_load((ppo / "recipe.resolved.yaml").read_text())
    original = (ppo / "recipe.resolved.yaml").read_text()
    recipe["hub"]["include_samples"] = True
    (ppo / "recipe.resolved.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    try:
        push_run(ppo, "rlhf-test/ppo")
        files = hub.uploaded("rlhf-test/ppo")
        assert {"samples.jsonl", "eval_samples.jsonl"} <= set(files)
        assert json.loads(files["eval_before.json"]) == json.loads((ppo / "eval_before.json").read_text())
        assert any(text in files["README.md"].decode() for text in texts)
        done = run_cli("push", ppo, "--repo-id", "rlhf-test/ppo", "--no-samples")
        assert done.exit_code == 0, done.output
        assert "samples.jsonl" not in hub.uploaded("rlhf-test/ppo")
    finally:
        (ppo / "recipe.resolved.yaml").write_text(original)


def test_an_eval_report_goes_only_with_samples(hub, real_runs):
    result = push_run(real_runs["eval"], "rlhf-test/eval")
    files = hub.uploaded("rlhf-test/eval")
    assert "eval.md" not in files and "quotes held-out prompts" in result.skipped["eval.md"]
    report = json.loads(files["eval.json"])
    assert "samples" not in report and "win_rate" in report["metrics"] and "plots" in report


# ---------------------------------------------------------------------------------------------------------------
# rlhf push --preview
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage, flags", [("ppo", ["--include-samples"]), ("dpo", ["--base-repo-id", "rlhf-test/sft"]),
                                          ("reward", [])])
def test_preview_writes_what_a_push_uploads(hub, real_runs, tmp_path, monkeypatch, stage, flags):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")  # a preview needs no token, and contacts nothing
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    run = real_runs[stage]
    before = _snapshot(run)
    done = run_cli("push", run, "--repo-id", f"rlhf-test/{stage}", "--preview", tmp_path / "preview", *flags)
    assert done.exit_code == 0, done.output
    assert hub.requests == [] and _snapshot(run) == before
    assert f"files in {tmp_path / 'preview'}" in done.output and "nothing was sent" in done.output
    assert "left out .rlhf-run.json: hidden" in done.output

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    done = run_cli("push", run, "--repo-id", f"rlhf-test/{stage}", *flags)
    assert done.exit_code == 0, done.output
    pushed = hub.uploaded(f"rlhf-test/{stage}")
    pushed.pop(".gitattributes")
    assert _snapshot(tmp_path / "preview") == pushed  # byte for byte, card and adapter config included
    if stage == "dpo":
        assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] == "rlhf-test/sft"


def test_preview_refuses_to_overwrite_or_to_write_into_the_run(hub, ppo_run, tmp_path):
    _write(tmp_path / "full" / "x.txt", "mine")
    done = run_cli("push", ppo_run, "--repo-id", PPO_REPO, "--preview", tmp_path / "full")
    assert done.exit_code == 2 and "not an empty directory" in done.output and "Traceback" not in done.output
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"
    done = run_cli("push", ppo_run, "--repo-id", PPO_REPO, "--preview", ppo_run / "preview")
    assert done.exit_code == 2 and "inside the run dir" in done.output
    assert not (ppo_run / "preview").exists() and hub.requests == []
    (tmp_path / "empty").mkdir()
    done = run_cli("push", ppo_run, "--repo-id", PPO_REPO, "--preview", tmp_path / "empty")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "empty" / "README.md").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging dir left


# ---------------------------------------------------------------------------------------------------------------
# a truthful card
# ---------------------------------------------------------------------------------------------------------------
def _snippet(card: str, repo_id: str, local: Path) -> str:
    """The card's Python snippet, with the repo id mapped to the local run dir."""
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert json.dumps(repo_id) in code
    return code.replace(json.dumps(repo_id), json.dumps(str(local)))


def _run_snippet(code: str, names: dict | None = None) -> str:
    """Run the snippet (its variables land in `names`); what it printed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<model card>", "exec"), names if names is not None else {})
    return out.getvalue()


def test_the_policy_snippet_samples_as_training_did(real_runs):
    """The snippet runs as printed (offline, the repo id mapped to the run dir) and draws the same tokens, seed for
    seed, as PPO's own sampler with the recipe's generation settings (top_k=0: the full softmax)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pipeline.ppo.modules import Prompts, sample_rollout
    from rlhf_pipeline.recipe.schema import PpoGenerationSection

    ppo = real_runs["ppo"]
    card = model_card(ppo, repo_id="rlhf-test/ppo", endpoint="https://hub.example", include_samples=True)
    code = _snippet(card, "rlhf-test/ppo", ppo)
    torch.manual_seed(7)
    printed = _run_snippet(code)

    prompt = json.loads(code.split("inputs = tokenizer(", 1)[1].split(", return_tensors", 1)[0])
    torch.manual_seed(7)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(ppo), AutoTokenizer.from_pretrained(ppo)
    generation = PpoGenerationSection(**yaml.safe_load((ppo / "recipe.resolved.yaml").read_text())["generation"])
    prompts = Prompts([prompt], [tokenizer(prompt)["input_ids"]])  # as PPO tokenizes a text prompt (BOS if any)
    rollout = sample_rollout(model, tokenizer, prompts, generation, torch.device("cpu"))
    assert printed == rollout.responses[0] + "\n"
    assert "top_k=0" in code


def test_the_adapter_snippet_runs(real_runs):
    dpo = real_runs["dpo"]
    card = model_card(dpo, repo_id="rlhf-test/dpo", endpoint="https://hub.example")
    code = _snippet(card, "rlhf-test/dpo", dpo)
    assert "AutoPeftModelForCausalLM" in code and "top_k=0" in code
    assert _run_snippet(code).endswith("\n")


def test_the_reward_snippet_scores_as_the_reward_stage_does(real_runs):
    """prompt and response defined, EOS appended as RewardTrainer appends it: the snippet's score is the score the
    pipeline gives the same pair (rlhf_pipeline.scoring)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_pipeline.scoring import RewardModel, reward_input_ids

    reward = real_runs["reward"]
    card = model_card(reward, repo_id="rlhf-test/reward", endpoint="https://hub.example")
    names: dict = {}
    printed = float(_run_snippet(_snippet(card, "rlhf-test/reward", reward), names))
    tokenizer = AutoTokenizer.from_pretrained(reward)
    prompt, response = names["prompt"], names["response"]
    assert tokenizer(names["text"])["input_ids"] == reward_input_ids(tokenizer, prompt, response)
    assert names["text"].endswith(tokenizer.eos_token) and not response.endswith(tokenizer.eos_token)
    scorer = RewardModel(AutoModelForSequenceClassification.from_pretrained(reward), tokenizer)
    assert printed == pytest.approx(scorer.score([prompt], [response]).item(), abs=1e-5)


def test_base_model_through_runs_never_pushed(hub, tmp_path, capsys):
    """A PPO policy whose SFT run was never pushed, the SFT having started from gpt2 on the Hub: the card names gpt2,
    the nearest published ancestor (a fine-tune of it, through the local SFT run, as the card says), and the push
    says which run to push first to name the direct parent instead."""
    sft = _finished_run(tmp_path / "sft", {"stage": "sft", "output_dir": "x", "model": {"name_or_path": "gpt2"}},
                        {"eval_loss": 2.0}, weights=False)
    recipe = {"stage": "ppo", "output_dir": "y", "policy": {"name_or_path": str(sft)},
              "reward": {"function": "rlhf_pipeline.tiny.annotator:gold_score"}}
    ppo = _finished_run(tmp_path / "ppo", recipe, {"eval_score_after": 1.0})
    result = run_cli("push", ppo, "--repo-id", PPO_REPO)
    assert result.exit_code == 0, result.output
    card = _hub_card(PPO_REPO)
    assert (card.data.base_model, card.data.base_model_relation) == ("gpt2", "finetune")
    assert f"The card's `base_model` is [gpt2]({hub.url}/gpt2), the nearest model on the Hub" in card.text
    assert "the local sft run in between was not pushed" in card.text
    assert f"- **policy:** a local sft run (not pushed), trained from [gpt2]({hub.url}/gpt2)" in card.text
    assert f"rlhf push {sft} --repo-id ORG/NAME" in result.output and "--base-repo-id" in result.output

    # pushed upstream first: the direct parent
    push_run(sft, "rlhf-test/sft")
    push_run(ppo, PPO_REPO)
    assert _hub_card(PPO_REPO).data.base_model == "rlhf-test/sft"
    assert "nearest model on the Hub" not in _hub_card(PPO_REPO).text


def test_no_base_model_for_a_line_that_started_from_scratch(real_runs, hub):
    result = push_run(real_runs["ppo"], "rlhf-test/ppo")
    assert "base_model" not in _hub_card("rlhf-test/ppo").data.to_dict()
    assert any("names no base_model" in note and "started from scratch" in note for note in result.notes)
    push_run(real_runs["pretrain"], "rlhf-test/pretrain")
    result = push_run(real_runs["ppo"], "rlhf-test/ppo")
    assert _hub_card("rlhf-test/ppo").data.base_model == "rlhf-test/pretrain"
    assert any("nearest model on the Hub" in note for note in result.notes)


@pytest.mark.parametrize("stage, estimator, tags, papers", [
    ("pretrain", None, ["rlhf-pipeline", "transformers", "pretrain"], []),
    ("sft", None, ["rlhf-pipeline", "trl", "sft"], []),
    ("reward", None, ["rlhf-pipeline", "trl", "rlhf", "reward", "reward-model"], ["2203.02155"]),
    ("ppo", "gae", ["rlhf-pipeline", "rlhf", "ppo"], ["1707.06347", "2203.02155"]),
    ("ppo", "rloo", ["rlhf-pipeline", "rlhf", "rloo"], ["2402.14740"]),
    ("ppo", "grpo", ["rlhf-pipeline", "rlhf", "grpo"], ["2402.03300"]),
    ("dpo", None, ["rlhf-pipeline", "trl", "rlhf", "dpo"], ["2305.18290"]),
])
def test_tags_and_papers_name_what_trained_it(tmp_path, stage, estimator, tags, papers):
    recipe = {"stage": stage, "output_dir": "x", "model": {"name_or_path": "gpt2"}}
    if estimator:
        recipe.update(policy={"name_or_path": "gpt2"}, training={"advantage_estimator": estimator})
    card = model_card(_finished_run(tmp_path / stage, recipe, {"eval_loss": 1.0}), endpoint="https://hub.example")
    assert _front_matter(card)["tags"] == tags
    cited = re.findall(r"\[arXiv:(\d{4}\.\d{5})\]\(https://arxiv\.org/abs/\1\)", card)
    assert cited == papers
    bibtex = card.split("```bibtex\n", 1)[1].split("\n```", 1)[0] if "```bibtex" in card else ""
    assert all(paper in bibtex for paper in papers)
    assert ("@software{vonwerra2020trl," in bibtex) == ("trl" in tags)


# ---------------------------------------------------------------------------------------------------------------
# the tool's commit: from the installed package's metadata, never from the folder around it
# ---------------------------------------------------------------------------------------------------------------
def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def _new_repo(path: Path) -> str:
    """A git repo at `path` with one commit of what is there; its HEAD."""
    _git(path, "init", "-q")
    _git(path, "add", "-A")
    _git(path, "commit", "-qm", "someone else's project")
    return _git(path, "rev-parse", "HEAD")


def _recorded_commit(sys_path: Path, cwd: Path) -> dict | None:
    code = "import json; from rlhf_pipeline import runs; print(json.dumps(runs.git_commit()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(sys_path)})
    return json.loads(done.stdout)


def _copy_package(target: Path) -> None:
    shutil.copytree(REPO / "rlhf_pipeline", target / "rlhf_pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))


def test_the_tool_commit_is_never_the_commit_of_the_repo_around_it(tmp_path):
    # a wheel installed into a virtualenv inside the user's own repo: site-packages with the dist's metadata
    site = tmp_path / "user-project" / ".venv" / "site-packages"
    _copy_package(site)
    dist = site / "rlhf_pipeline-0.1.0.dist-info"
    _write(dist / "METADATA", "Metadata-Version: 2.1\nName: rlhf-pipeline\nVersion: 0.1.0\n")
    _write(dist / "RECORD", "")
    _write(dist / "direct_url.json", json.dumps({"url": "file:///somewhere/rlhf_pipeline-0.1.0-py3-none-any.whl",
                                                 "archive_info": {}}))
    users_commit = _new_repo(tmp_path / "user-project")
    assert _recorded_commit(site, tmp_path / "user-project") is None

    # installed from git: the commit pip recorded
    _write(dist / "direct_url.json", json.dumps({"url": "https://github.com/example/rlhf-pipeline.git",
                                                 "vcs_info": {"vcs": "git", "commit_id": GIT_COMMIT}}))
    assert _recorded_commit(site, tmp_path / "user-project") == {"commit": GIT_COMMIT, "dirty": False}

    # the package folder copied into another project's repo, run from there: not that project's commit
    vendored = tmp_path / "other-project"
    _copy_package(vendored / "vendor")
    _write(vendored / "pyproject.toml", '[project]\nname = "other-project"\n')
    _new_repo(vendored)
    for sys_path in (vendored / "vendor", vendored):
        if sys_path == vendored:
            shutil.move(str(vendored / "vendor" / "rlhf_pipeline"), str(vendored / "rlhf_pipeline"))
            _git(vendored, "add", "-A")
            _git(vendored, "commit", "-qm", "move")
        assert _recorded_commit(sys_path, vendored) is None
    assert users_commit not in json.dumps(_recorded_commit(vendored, vendored))

    # a checkout of rlhf-pipeline itself: its HEAD
    checkout = tmp_path / "rlhf-pipeline"
    _copy_package(checkout)
    shutil.copy(REPO / "pyproject.toml", checkout / "pyproject.toml")
    head = _new_repo(checkout)
    assert _recorded_commit(checkout, tmp_path) == {"commit": head, "dirty": False}
