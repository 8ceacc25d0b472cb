"""`rlhf label` without a browser: the statistics, the store (labels saved as given, never asked twice), seeded
sampling that a restart does not redo, the recipe, the preference dataset training DPO, `rlhf eval`'s human win rate,
the dataset push, and the server's safety (password, blocked routes). The page itself: test_label_browser.py."""

from __future__ import annotations

import getpass
import http.cookiejar
import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import FAST_TRAINING, TOKEN, run_cli, write_jsonl, write_recipe
from label_support import LabelServer, free_port, label_recipe, open_run, require_gradio

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.label import stats
from rlhf_pipeline.label.store import (
    LABELS_FILE,
    PREFERENCES_FILE,
    SAMPLES_FILE,
    Item,
    item_id,
    item_seed,
    needs_second_labeler,
)


def prompts_data(data_dir: Path) -> dict:
    return {"files": {"train": str(data_dir / "prompts.jsonl"), "test": str(data_dir / "prompts-test.jsonl")}}


def add_items(store, prompts: list, k: int = 3, mode: str = "rank") -> None:
    """Stored responses, as the sampler would store them (distinct texts)."""
    for index, prompt in enumerate(prompts):
        if mode == "ab":
            models = ["policy", "baseline"] if index % 2 else ["baseline", "policy"]
            store.add_item(Item(item_id(index), index, prompt, [f"{m} says {index}" for m in models], models,
                                item_seed(0, index), candidate="policy"))
        else:
            store.add_item(Item(item_id(index), index, prompt, [f"answer {j} to {index}" for j in range(k)],
                                ["policy"] * k, item_seed(0, index)))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------------------------
def test_rankings_expand_to_pairs_with_their_ranks():
    # a full ranking of 4: the 6 pairs it orders, as InstructGPT expanded its labelers' rankings
    assert stats.pairs_from_ranking([2, 0, 3, 1], 4) == [
        (2, 0, 1, 2), (2, 3, 1, 3), (2, 1, 1, 4), (0, 3, 2, 3), (0, 1, 2, 4), (3, 1, 3, 4)]
    assert stats.pairs_from_ranking([2, 0, 3], 4) == stats.pairs_from_ranking([2, 0, 3, 1], 4)  # the last implied
    # the best only: it beats each of the others, which share rank 2 and are not compared
    assert stats.pairs_from_ranking([1], 3) == [(1, 0, 1, 2), (1, 2, 1, 2)]
    assert stats.pairs_from_ranking([0, 2], 4) == [(0, 2, 1, 2), (0, 1, 1, 3), (0, 3, 1, 3), (2, 1, 2, 3),
                                                   (2, 3, 2, 3)]
    for bad in ([], [0, 0], [3], "0", [0.5]):
        with pytest.raises(ValueError):
            stats.check_ranking(bad, 3)


def test_agreement_and_kappa_by_hand():
    # two labelers, four units: a a | a b | b b | b b
    units = {1: {"ann": "a", "bob": "a"}, 2: {"ann": "a", "bob": "b"}, 3: {"ann": "b", "bob": "b"},
             4: {"ann": "b", "bob": "b"}, 5: {"ann": "a"}}  # unit 5 has one labeler: not compared
    result = stats.agreement(units)
    assert result["units"] == 4 and result["comparisons"] == 4
    assert result["pairwise_agreement"] == pytest.approx(0.75)
    # coincidences: o(a,a) = 2, o(a,b) = o(b,a) = 1, o(b,b) = 4; n_a = 3, n_b = 5, n = 8: 1 - 7 * 2 / (2 * 3 * 5)
    assert result["krippendorff_alpha"] == pytest.approx(1 - 14 / 30)
    # ann a a b b, bob a b b b: observed 3/4, chance 1/2 * 1/4 + 1/2 * 3/4 = 1/2
    assert result["cohen_kappa"]["ann vs bob"] == {"units": 4, "agreement": 0.75, "kappa": pytest.approx(0.5)}
    three = stats.agreement({1: {"a": "x", "b": "x", "c": "y"}, 2: {"a": "y", "b": "y", "c": "y"}})
    assert three["comparisons"] == 6 and three["pairwise_agreement"] == pytest.approx(4 / 6)
    assert set(three["cohen_kappa"]) == {"a vs b", "a vs c", "b vs c"}
    same = stats.agreement({1: {"a": "x", "b": "x"}, 2: {"a": "x", "b": "x"}})
    assert same["pairwise_agreement"] == 1.0 and same["krippendorff_alpha"] is None  # no disagreement expected
    assert stats.agreement({1: {"a": "x"}})["pairwise_agreement"] is None


def test_wilson_interval_and_win_rates():
    low, high = stats.wilson_interval(0.5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = stats.wilson_interval(0.0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    models = ["baseline", "policy"]
    assert stats.candidate_score({"decision": "ranking", "ranking": [1, 0]}, models, "policy") == 1.0
    assert stats.candidate_score({"decision": "ranking", "ranking": [0]}, models, "policy") == 0.0
    assert stats.candidate_score({"decision": "bad"}, models, "policy") == 0.5
    assert stats.candidate_score({"decision": "skip"}, models, "policy") is None
    rates = stats.win_rates([("p", [1.0], {"wins": 1}), ("p", [1.0, 0.0], {"wins": 1, "losses": 1}),
                             ("p", [], {}), ("q", [0.5], {"ties": 1})])
    assert rates["p"]["win_rate"] == pytest.approx(0.75) and rates["p"]["prompts"] == 2  # the skip: not counted
    assert (rates["p"]["low"], rates["p"]["high"]) == pytest.approx(stats.wilson_interval(0.75, 2))
    assert rates["p"]["wins"] == 2 and rates["p"]["losses"] == 1 and rates["q"]["ties"] == 1


# ---------------------------------------------------------------------------------------------------------------
# the store: every label saved as given, nothing asked twice
# ---------------------------------------------------------------------------------------------------------------
def test_labels_are_saved_as_given_and_never_asked_twice(tmp_path, data_dir):
    out = tmp_path / "labels"
    recipe = label_recipe(out, prompts_data(data_dir), "unused")
    _, store = open_run(tmp_path / "label.yaml", recipe, list(range(4)))
    add_items(store, ["p0", "p1", "p2", "p3"])
    item, state = store.next_item("ann")
    assert (item.item, state) == ("000000", "ready")
    assert store.next_item("ann")[0].item == "000000"  # a reloaded page shows the same prompt again
    assert store.next_item("bob")[0].item == "000001"  # ann holds 000000
    assert store.record("ann", "000000", "ranking", [2, 0]) is True
    assert store.record("ann", "000000", "tie") is False  # a second submit writes nothing
    assert len(lines(out / LABELS_FILE)) == 1  # on disk as soon as it is given
    pairs = lines(out / PREFERENCES_FILE)
    assert [(p["chosen"], p["rejected"], p["chosen_rank"], p["rejected_rank"]) for p in pairs] == [
        ("answer 2 to 0", "answer 0 to 0", 1, 2), ("answer 2 to 0", "answer 1 to 0", 1, 3),
        ("answer 0 to 0", "answer 1 to 0", 2, 3)]
    assert pairs[0]["prompt"] == "p0" and pairs[0]["item"] == "000000" and pairs[0]["labeler"] == "ann"
    assert store.record("ann", "000002", "skip") is True
    for bad in (("000001", "ranking", [5]), ("000001", "best", None), ("000009", "tie", None),
                ("000001", "tie", [0])):
        with pytest.raises(ValueError):
            store.record("ann", *bad)
    store.close()
    with open(out / LABELS_FILE, "ab") as handle:  # a kill in the middle of writing a label: a torn last line
        handle.write(b'{"item": "000003", "labe')
    (out / PREFERENCES_FILE).write_text("")  # ... or between the label and its pairs

    _, store = open_run(tmp_path / "label.yaml", recipe, list(range(4)))
    assert [row["item"] for row in lines(out / LABELS_FILE)] == ["000000", "000002"]  # the torn line is gone
    assert lines(out / PREFERENCES_FILE) == pairs  # rebuilt from the labels
    seen = [store.next_item("ann")[0].item]
    store.record("ann", seen[0], "bad")
    seen.append(store.next_item("ann")[0].item)
    store.record("ann", seen[1], "ranking", [1])
    assert seen == ["000001", "000003"]  # never a labelled prompt again
    assert store.next_item("ann") == (None, "done")
    assert store.progress("ann") == {"complete": 4, "total": 4, "mine": 4}
    summary = store.summary()
    assert summary["decisions"] == {"ranking": 2, "skip": 1, "bad": 1} and summary["pairs"] == 5
    store.close()


def test_prompts_still_being_sampled_and_the_sampler_throttle(tmp_path, data_dir):
    _, store = open_run(tmp_path / "label.yaml", label_recipe(tmp_path / "labels", prompts_data(data_dir), "unused",
                                                              ahead=2), list(range(4)))
    assert store.next_item("ann") == (None, "waiting")
    add_items(store, ["p0", "p1"])
    assert not store._untouched() < store.ahead  # two untouched prompts: the sampler waits
    store.next_item("ann")
    assert store._untouched() < store.ahead  # ann took one: the sampler goes on
    store.fail("boom")
    store.record("ann", "000000", "tie")
    store.next_item("ann")
    store.record("ann", "000001", "tie")
    assert store.next_item("ann") == (None, "failed")
    store.close()


def test_overlap_gives_prompts_a_second_labeler_and_agreement_is_reported(tmp_path, data_dir):
    assert 0.07 < sum(needs_second_labeler(0, i, 0.1) for i in range(2000)) / 2000 < 0.13
    recipe = label_recipe(tmp_path / "labels", prompts_data(data_dir), "unused", overlap=1.0)
    _, store = open_run(tmp_path / "label.yaml", recipe, list(range(3)))
    add_items(store, ["p0", "p1", "p2"])
    for labeler, decisions in (("ann", [[0, 1], [0, 1], [2, 1]]), ("bob", [[0, 1], [2, 1], "tie"])):
        for decision in decisions:
            item, _ = store.next_item(labeler)
            if decision == "tie":
                store.record(labeler, item.item, "tie")
            else:
                store.record(labeler, item.item, "ranking", decision)
    assert store.next_item("cay") == (None, "done")  # two labels each: nothing for a third labeler
    agreement = store.summary()["agreement"]
    # per pair of responses: prompt 0 agrees on all 3; prompt 1 on 1 (ann 0>1>2, bob 2>1>0... (0,2) and (1,2)
    # reversed, (0,1) reversed): 0 of 3; prompt 2 (ann's ranking, bob's tie): 0 of 3
    assert agreement["units"] == 9 and agreement["pairwise_agreement"] == pytest.approx(3 / 9)
    assert agreement["cohen_kappa"]["ann vs bob"]["units"] == 9
    store.close()
    _, store = open_run(tmp_path / "label.yaml", {**recipe, "overlap": 0.0}, list(range(3)))
    assert store.progress()["complete"] == 3
    store.close()


def test_conversational_prompts_give_conversational_pairs(tmp_path, data_dir):
    from trl.data_utils import is_conversational

    _, store = open_run(tmp_path / "label.yaml", label_recipe(tmp_path / "labels", prompts_data(data_dir), "unused"),
                        list(range(1)))
    chat = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hello <b>there</b>"}]
    add_items(store, [chat])
    store.record("ann", "000000", "ranking", [1, 2, 0])
    rows = lines(tmp_path / "labels" / PREFERENCES_FILE)
    assert len(rows) == 3 and all(is_conversational(row) for row in rows)
    assert rows[0]["prompt"] == chat and rows[0]["chosen"] == [{"role": "assistant", "content": "answer 1 to 0"}]
    store.close()


# ---------------------------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"mode": "ab"}, "`ab` mode compares a policy with a `baseline`"),
    ({"baseline": {"name_or_path": "m"}}, "`baseline` is for `ab` mode"),
    ({"policies": {"a": {"name_or_path": "m"}}}, "give `policy` (one model) or `policies`"),
    ({"policy": None, "policies": {"baseline": {"name_or_path": "m"}}}, "is not a usable name"),
    ({"mode": "ab", "baseline": {"name_or_path": "m"}, "responses_per_prompt": 3}, "`ab` mode shows 2 responses"),
    ({"mode": "ab", "baseline": {"name_or_path": "m"}, "responses_per_prompt": None},
     "labels the held-out prompts: set `data.eval_split`"),
    ({"split": "held_out"}, "`split: held_out` labels the held-out prompts"),
    ({"labelers": []}, "an empty list allows nobody"),
    ({"hub": {"push": True, "repo_id": "a/b"}}, "hub: a labelling run is published with `rlhf push OUTPUT_DIR"),
    ({"respones_per_prompt": 4}, "did you mean 'responses_per_prompt'"),
    ({"responses_per_prompt": 10}, "less than or equal to 9"),
    ({"overlap": 1.5}, "less than or equal to 1"),
    ({"policy": {"name_or_path": "m", "generation": {"temprature": 1}}}, "did you mean 'temperature'"),
])
def test_bad_label_recipes(tmp_path, data_dir, change, message):
    recipe = {k: v for k, v in {**label_recipe(tmp_path / "o", {"files": str(data_dir / "prompts.jsonl")}, "m"),
                                **change}.items() if v is not None}
    result = run_cli("recipe", "validate", write_recipe(tmp_path / "label.yaml", recipe))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_a_labelling_run_goes_on_only_with_the_same_recipe(tmp_path, data_dir):
    from rlhf_pipeline.label.serve import output_dir_state
    from rlhf_pipeline.recipe.load import load_recipe

    out = tmp_path / "labels"
    recipe = label_recipe(out, prompts_data(data_dir), "m")
    _, store = open_run(tmp_path / "label.yaml", recipe, [0])
    store.close()

    def state(**change):
        return output_dir_state(load_recipe(write_recipe(tmp_path / "again.yaml", {**recipe, **change})))

    assert state() == "continue"
    assert state(num_prompts=50, overlap=0.2, labelers=["ann"], server={"port": 9999}) == "continue"
    with pytest.raises(UserError, match=r"differs at: seed, generation\.temperature\)"):
        state(generation={"response_length": 6, "temperature": 1.0}, seed=3)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an rlhf run directory"):
        state(output_dir=str(tmp_path / "foreign"))


def test_refused_before_anything_is_loaded_or_written(tmp_path, data_dir, monkeypatch):
    """Exposing the page needs a password; a port in use is named."""
    require_gradio()
    out = tmp_path / "labels"
    path = write_recipe(tmp_path / "label.yaml", label_recipe(out, prompts_data(data_dir), "m"))
    monkeypatch.delenv("RLHF_LABEL_PASSWORD", raising=False)
    result = run_cli("label", path, "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert "exposes the labelling page to other machines, so it needs a password: set RLHF_LABEL_PASSWORD" in \
        result.output
    monkeypatch.setenv("RLHF_LABEL_PASSWORD", "short")
    result = run_cli("label", path, "--host", "0.0.0.0")
    assert result.exit_code == 2 and "at least 8 characters" in result.output
    monkeypatch.delenv("RLHF_LABEL_PASSWORD")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_cli("label", path, "--port", port)
    assert result.exit_code == 2 and f"cannot serve on 127.0.0.1:{port}: Address already in use" in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# sampling: ahead, seeded per prompt, never redone
# ---------------------------------------------------------------------------------------------------------------
def test_samples_are_seeded_per_prompt_and_a_restart_does_not_resample(tmp_path, tiny_model_dir, data_dir):
    from rlhf_pipeline.label.sampler import Sampler, sample_item
    from rlhf_pipeline.label.serve import load_setup

    out = tmp_path / "labels"
    recipe = label_recipe(out, prompts_data(data_dir), tiny_model_dir, num_prompts=4)
    loaded, store = open_run(tmp_path / "label.yaml", recipe, list(range(4)))
    setup = load_setup(loaded)
    assert setup.planned == [0, 1, 2, 3]
    sampled = []

    def sample(index, position):
        sampled.append(index)
        return sample_item(index, position, setup.prompts, setup.models, setup.tokenizer, "rank", 3, 0, setup.device)

    Sampler(store, setup.planned, sample).run()  # in this thread: the same code the background thread runs
    store.close()
    first = (out / SAMPLES_FILE).read_bytes()
    rows = lines(out / SAMPLES_FILE)
    assert [r["item"] for r in rows] == ["000000", "000001", "000002", "000003"] and sampled == [0, 1, 2, 3]
    assert all(len(r["responses"]) == 3 and r["models"] == ["policy"] * 3 for r in rows)
    assert rows[2]["prompt"] == setup.prompts.texts[2]
    # a prompt samples the same responses whenever it is sampled (alone, after others, in another session)
    assert sample(2, 2).responses == rows[2]["responses"]
    # a kill while prompt 3's row was being written: the restart samples prompt 3 again, and only prompt 3
    (out / SAMPLES_FILE).write_bytes(first[: first.rindex(b'"responses"', 0, len(first))])
    sampled.clear()
    loaded, store = open_run(tmp_path / "label.yaml", recipe, list(range(4)))
    Sampler(store, setup.planned, sample).run()
    store.close()
    assert sampled == [3] and (out / SAMPLES_FILE).read_bytes() == first


def test_ab_sides_are_drawn_per_prompt_and_each_model_has_its_own_seed(tmp_path, tiny_model_dir, data_dir):
    from rlhf_pipeline.label.sampler import sample_item
    from rlhf_pipeline.label.serve import load_setup
    from rlhf_pipeline.recipe.load import load_recipe

    recipe = label_recipe(tmp_path / "labels", {**prompts_data(data_dir), "eval_split": "test"}, tiny_model_dir,
                          mode="ab", baseline={"name_or_path": str(tiny_model_dir)})
    del recipe["responses_per_prompt"]
    setup = load_setup(load_recipe(write_recipe(tmp_path / "ab.yaml", recipe)))
    items = [sample_item(i, i, setup.prompts, setup.models, setup.tokenizer, "ab", 2, 0, setup.device, ["policy"])
             for i in setup.planned]
    assert {tuple(item.models) for item in items} == {("policy", "baseline"), ("baseline", "policy")}
    assert all(item.candidate == "policy" for item in items)
    # the same weights, each under its own seed: two samples, not one shown twice (a forced tie)
    assert sum(item.responses[0] != item.responses[1] for item in items) > len(items) // 2
    again = sample_item(3, 3, setup.prompts, setup.models, setup.tokenizer, "ab", 2, 0, setup.device, ["policy"])
    assert again == items[3]
    assert items[0].prompt == setup.prompts.texts[0]  # the held-out split (prompts-test.jsonl)


# ---------------------------------------------------------------------------------------------------------------
# what the labels are for: DPO trains on them, `rlhf eval` reports the human win rate, `rlhf push` publishes them
# ---------------------------------------------------------------------------------------------------------------
def test_dpo_trains_on_the_preference_dataset(tmp_path, tiny_model_dir, data_dir, tiny_world):
    out = tmp_path / "labels"
    prompts = [row["prompt"] for row in tiny_world["preferences-train"][:8]]
    _, store = open_run(tmp_path / "label.yaml", label_recipe(out, prompts_data(data_dir), "unused"), list(range(8)))
    for index, row in enumerate(tiny_world["preferences-train"][:8]):
        store.add_item(Item(item_id(index), index, prompts[index], [row["chosen"], row["rejected"], row["chosen"][:5]],
                            ["policy"] * 3, 0))
        store.record("ann", item_id(index), "ranking", [0, 1])
    store.close()
    assert len(lines(out / PREFERENCES_FILE)) == 24
    recipe = {"stage": "dpo", "seed": 0, "output_dir": str(tmp_path / "dpo"), "model": {"name_or_path":
              str(tiny_model_dir)}, "data": {"files": str(out / PREFERENCES_FILE), "eval_size": 4},
              "generation": {"response_length": 4}, "evaluation": {"prompts": 2, "batch_size": 2},
              "training": {**FAST_TRAINING, "max_steps": 2}}
    result = run_cli("dpo", write_recipe(tmp_path / "dpo.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert "eval_rewards/accuracies" in json.loads((tmp_path / "dpo" / "metrics.json").read_text())


def test_conversational_prompts_sampled_from_a_chat_model_train_a_reward_model(tmp_path, tiny_world):
    """Conversations through the chat template (an instruct model's ChatML), labelled: the pairs are conversational
    (TRL's format) and `rlhf reward` trains on them as they are."""
    from trl.data_utils import is_conversational
    from zoo import build

    from rlhf_pipeline.label.sampler import Sampler, sample_item
    from rlhf_pipeline.label.serve import load_setup

    model = build("instruct", tmp_path / "zoo", [r["text"] for r in tiny_world["corpus"]])
    chats = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in tiny_world["prompts-train"][:6]]
    data = {"files": str(write_jsonl(tmp_path / "chat-prompts.jsonl", chats))}
    out = tmp_path / "labels"
    recipe = label_recipe(out, data, model, generation={"response_length": 8})
    loaded, store = open_run(tmp_path / "label.yaml", recipe, list(range(6)))
    setup = load_setup(loaded)
    Sampler(store, setup.planned, lambda index, position: sample_item(
        index, position, setup.prompts, setup.models, setup.tokenizer, "rank", 3, 0, setup.device)).run()
    for index in range(6):
        assert store.items[item_id(index)].prompt == chats[index]["prompt"]
        store.record("ann", item_id(index), "ranking", [index % 3])
    store.close()
    rows = lines(out / PREFERENCES_FILE)
    assert rows and all(is_conversational(row) and row["chosen"][0]["role"] == "assistant" for row in rows)
    assert not any("<|im_end|>" in row["chosen"][0]["content"] for row in rows)  # the end of turn is not text
    reward = {"stage": "reward", "seed": 0, "output_dir": str(tmp_path / "reward"), "model": {"name_or_path":
              str(model)}, "data": {"files": str(out / PREFERENCES_FILE), "eval_size": 2},
              "training": {**FAST_TRAINING, "max_steps": 2}}
    result = run_cli("reward", write_recipe(tmp_path / "reward.yaml", reward))
    assert result.exit_code == 0, result.output


def ab_run(tmp_path: Path, data_dir: Path, policy: Path, baseline: Path, labels: list) -> Path:
    """An A/B labelling run of `policy` against `baseline`; `labels`: (prompt index, decision, ranking)."""
    out = tmp_path / "labels-ab"
    recipe = label_recipe(out, {**prompts_data(data_dir), "eval_split": "test"}, policy, mode="ab",
                          baseline={"name_or_path": str(baseline)})
    del recipe["responses_per_prompt"]
    _, store = open_run(tmp_path / "ab.yaml", recipe, list(range(6)))
    add_items(store, [f"prompt {i}" for i in range(6)], mode="ab")
    for index, decision, ranking in labels:
        store.record("ann", item_id(index), decision, ranking)
    store.close()
    return out


def test_eval_reports_the_human_win_rate(tmp_path, tiny_model_dir, tiny_reward_dir, data_dir):
    # sides: even prompts show [baseline, policy], odd ones [policy, baseline] (add_items)
    out = ab_run(tmp_path, data_dir, tiny_model_dir, tiny_model_dir, [
        (0, "ranking", [1, 0]), (1, "ranking", [0, 1]), (2, "ranking", [1]),  # the policy wins 3 times
        (3, "ranking", [1, 0]), (4, "tie", None), (5, "skip", None)])  # loses once, a tie; a skip does not count
    recipe = {"stage": "eval", "seed": 0, "output_dir": str(tmp_path / "eval"),
              "policy": {"name_or_path": str(tiny_model_dir)}, "baseline": {"name_or_path": str(tiny_model_dir)},
              "reward": {"model": str(tiny_reward_dir)}, "data": {**prompts_data(data_dir), "eval_split": "test"},
              "generation": {"response_length": 4}, "num_prompts": 4, "batch_size": 4, "human_labels": str(out)}
    result = run_cli("eval", write_recipe(tmp_path / "eval.yaml", recipe))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["human_win_rate"] == pytest.approx(3.5 / 5) and metrics["human_win_rate_prompts"] == 5
    low, high = stats.wilson_interval(0.7, 5)
    assert (metrics["human_win_rate_low"], metrics["human_win_rate_high"]) == (pytest.approx(low), pytest.approx(high))
    assert metrics["policy_human_win_rate"] == metrics["human_win_rate"] and metrics["human_labelers"] == 1
    report = (tmp_path / "eval" / "eval.md").read_text()
    assert "Judged by people" in report and f"**0.700** (95% Wilson interval {low:.3f}-{high:.3f}" in report
    assert f"| win rate (human, 95% interval) | - | 0.700 [{low:.3f}, {high:.3f}], 5 prompts |" in report
    assert "human win rate 0.700" in result.output

    wrong = {**recipe, "output_dir": str(tmp_path / "eval2"), "baseline": {"name_or_path": str(tiny_reward_dir)}}
    result = run_cli("eval", write_recipe(tmp_path / "eval2.yaml", wrong))
    assert result.exit_code == 2 and "human_labels:" in result.output and "compared with the baseline" in \
        result.output
    assert not (tmp_path / "eval2").exists()


def test_push_labels_as_a_hub_dataset(tmp_path, hub, data_dir):
    from huggingface_hub import DatasetCard

    root = tmp_path / "zq9privatemarker"  # a path no uploaded byte may name
    out = ab_run(root, data_dir, root / "my-policy", root / "my-sft", [(0, "ranking", [1, 0]), (1, "tie", None),
                                                                      (2, "ranking", [1, 0])])
    result = run_cli("push", out, "--repo-id", "rlhf-test/my-labels", "--license", "mit")
    assert result.exit_code == 0, result.output
    assert "pushed 3 files to" in result.output
    files = hub.uploaded("rlhf-test/my-labels", repo_type="dataset")
    assert set(files) == {".gitattributes", "README.md", "preferences.jsonl", "summary.json"}
    rows = [json.loads(line) for line in files["preferences.jsonl"].decode().splitlines()]
    assert [(r["chosen"], r["rejected"], r["labeler"]) for r in rows] == [
        ("policy says 0", "baseline says 0", "labeler-1"), ("policy says 2", "baseline says 2", "labeler-1")]
    card = DatasetCard(files["README.md"].decode())
    assert card.data.license == "mit" and "rlhf" in card.data.tags
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train",
                                                                            "path": "preferences.jsonl"}]}]
    assert "| policy | 0.833 |" in card.text and "a local model (not on the Hub)" in card.text
    assert json.loads(files["summary.json"])["win_rates"]["policy"]["prompts"] == 3
    record = json.loads((out / "hub.json").read_text())
    assert record["repo_type"] == "dataset" and record["repo_id"] == "rlhf-test/my-labels"
    # nothing uploaded names the local paths, the labeler, the user or the machine; the token only authenticates
    uploaded = b"\n".join([*hub.bodies, *files.values(), *hub.lfs_objects.values()]).decode("utf-8", "replace")
    assert "zq9privatemarker" not in uploaded and str(tmp_path) not in uploaded
    assert '"ann"' not in uploaded and "labeler\": \"ann" not in uploaded
    host = socket.gethostname()
    assert len(host) < 4 or host not in uploaded
    assert not re.search(rf"(?<![\w-]){re.escape(getpass.getuser())}(?![\w-])", uploaded)
    assert TOKEN not in uploaded
    assert set(hub.authorizations) <= {f"Bearer {TOKEN}", None}


# ---------------------------------------------------------------------------------------------------------------
# the server: login, no file routes, the password never written
# ---------------------------------------------------------------------------------------------------------------
def test_server_login_blocked_routes_and_a_password_never_written(tmp_path, tiny_model_dir, data_dir):
    require_gradio()
    password = "s3cret-labelling-pw"
    port = free_port()
    out = tmp_path / "labels"
    recipe = label_recipe(out, prompts_data(data_dir), tiny_model_dir, num_prompts=2, labelers=["ann"],
                          server={"port": port})
    path = write_recipe(tmp_path / "label.yaml", recipe)
    server = LabelServer(path, tmp_path / "server.log", env={"RLHF_LABEL_PASSWORD": password})
    try:
        server.wait_ready()
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))

        def status(url: str, data: dict | None = None) -> int:
            body = urllib.parse.urlencode(data).encode() if data is not None else None
            try:
                with opener.open(server.url.rstrip("/") + url, data=body, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert status("/config") == 401  # nothing but the login page without logging in
        assert status("/login", {"username": "ann", "password": "wrong-password"}) >= 400
        assert status("/login", {"username": "eve", "password": password}) >= 400  # not among `labelers`
        assert status("/login", {"username": "ann", "password": password}) == 200
        assert status("/config") == 200
        for route in (f"/gradio_api/file={out / LABELS_FILE}", "/gradio_api/file=/etc/passwd",
                      f"/gradio_api/file/{out / LABELS_FILE}", "/gradio_api//file=/etc/passwd",
                      "/gradio_api/proxy=http://127.0.0.1:1/", "/gradio_api/upload_progress",
                      "/gradio_api/run-history/records", "/monitoring"):
            assert status(route) == 404, route
        assert status("/gradio_api/upload", {}) == 404
    finally:
        server.kill()
    written = [p for p in out.rglob("*") if p.is_file()] + [tmp_path / "server.log"]
    assert all(password.encode() not in p.read_bytes() for p in written)
