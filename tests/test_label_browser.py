"""`rlhf label` in a real browser: the server as a subprocess on a free loopback port, headless Chromium (the
system's, /usr/bin/chromium: no `playwright install`) driven by Playwright through ten prompts in each mode, with
clicks and keys; the server is killed (SIGKILL) halfway and restarted, the labelling finishes, the files are
checked, and `rlhf reward` trains on the result.

It must run (CI installs Gradio, playwright and Chromium: .ci/run); where one is missing it fails, unless
RLHF_LABEL_TESTS_MAY_SKIP=1 (never in CI) lets it skip. RLHF_LABEL_SCREENSHOTS=DIR saves the pages it sees there.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import FAST_TRAINING, run_cli, write_jsonl, write_recipe
from label_support import CHROMIUM, CHROMIUM_ARGS, LabelServer, free_port, label_recipe, require_browser

from rlhf_pipeline.label.store import LABELS_FILE, PREFERENCES_FILE, SAMPLES_FILE, Item, preference_rows

HOSTILE = '<script>top.p=1</script><img src=x onerror="top.p=2">'  # shown as text, never run
HOSTILE_RESPONSE = '<img src=y onerror="top.q=1"><b>bold</b> **strong** [a](javascript:top.q=2)'
TIMEOUT = 30_000  # ms: the longest any step may take (the first page load included)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Labeler:
    """One browser page of the labelling app, used as a labeler would."""

    def __init__(self, page, prompts: list[str], shots: Path | None):
        from playwright.sync_api import expect

        self.page, self.prompts, self.shots, self.expect = page, prompts, shots, expect

    def field(self, elem_id: str):
        return self.page.locator(f"#{elem_id}").locator("textarea, input").first

    def start(self, url: str, name: str, index: int) -> None:
        """Open the page, give a name (typed, then Enter), and wait for prompt `index`."""
        self.page.goto(url)
        self.field("rlhf-name").fill(name)
        self.field("rlhf-name").press("Enter")
        self.at(index)

    def at(self, index: int) -> None:
        self.expect(self.field("rlhf-prompt")).to_have_value(self.prompts[index], timeout=TIMEOUT)

    def keys(self, *keys: str) -> None:
        for key in keys:
            self.page.keyboard.press(key)

    def click(self, *elem_ids: str) -> None:
        for elem_id in elem_ids:
            self.page.click(f"#{elem_id}")

    def shows(self, elem_id: str, value: str) -> None:
        self.expect(self.field(elem_id)).to_have_value(value, timeout=TIMEOUT)

    def responses(self, names: list[str]) -> list[str]:
        return [self.field(f"rlhf-response-{name}").input_value() for name in names]

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


def stop(server: LabelServer) -> None:
    """Ctrl-C: the server stops cleanly and writes summary.json."""
    server.process.send_signal(signal.SIGINT)
    assert server.process.wait(timeout=60) == 0, server.output()


def test_label_in_a_browser_both_modes_killed_and_restarted(tmp_path, tiny_model_dir, tiny_world):
    require_browser()
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ["RLHF_LABEL_SCREENSHOTS"]) if os.environ.get("RLHF_LABEL_SCREENSHOTS") else None
    train = [row["prompt"] for row in tiny_world["prompts-train"][:10]]
    train[0] = f"{HOSTILE} {train[0][:16]}"
    held_out = [row["prompt"] for row in tiny_world["prompts-test"][:10]]
    data = {"files": {"train": str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in train])),
                      "test": str(write_jsonl(tmp_path / "prompts-test.jsonl", [{"prompt": p} for p in held_out]))},
            "eval_split": "test"}
    other = other_model(tiny_model_dir, tmp_path / "other-model")
    # both servers start at once (each takes seconds to import its libraries); each mode then runs its session
    rank = write_recipe(tmp_path / "rank.yaml", label_recipe(tmp_path / "labels", data, tiny_model_dir,
                                                             num_prompts=10, server={"port": free_port()}))
    ab = label_recipe(tmp_path / "labels-ab", data, tiny_model_dir, mode="ab", baseline={"name_or_path": str(other)},
                      num_prompts=10, server={"port": free_port()})
    del ab["responses_per_prompt"]
    ab = write_recipe(tmp_path / "ab.yaml", ab)
    servers = [LabelServer(rank, tmp_path / "rank.log"), LabelServer(ab, tmp_path / "ab.log")]
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                rank_dir = rank_session(browser, servers[0], train, shots)
                ab_session(browser, servers[1], held_out, (tiny_model_dir, other), shots)
            finally:
                browser.close()
    finally:
        for server in servers:
            server.kill()

    # what the labels are for: a reward model trains on them as they are
    recipe = {"stage": "reward", "seed": 0, "output_dir": str(tmp_path / "reward"),
              "model": {"name_or_path": str(tiny_model_dir)},
              "data": {"files": str(rank_dir / PREFERENCES_FILE), "eval_size": 3},
              "training": {**FAST_TRAINING, "max_steps": 2}}
    result = run_cli("reward", write_recipe(tmp_path / "reward.yaml", recipe))
    assert result.exit_code == 0, result.output
    assert 0 <= json.loads((tmp_path / "reward" / "metrics.json").read_text())["eval_accuracy"] <= 1


def rank_session(browser, server: LabelServer, prompts: list[str], shots) -> Path:
    out = server.output_dir
    server.wait_ready()
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    ann = Labeler(page, prompts, shots)
    ann.start(server.url, "ann", 0)
    # a hostile prompt is shown as text, and nothing of it runs
    assert page.evaluate("() => [typeof top.p, document.querySelectorAll('img[src=\"x\"]').length]") == [
        "undefined", 0]
    assert not any("top.p" in text for text in page.eval_on_selector_all("script", "s => s.map(e => e.textContent)"))
    stored = {row["item"]: row for row in rows_of(out / SAMPLES_FILE)}
    assert ann.responses(["1", "2", "3"]) == stored["000000"]["responses"]  # shown as stored, in order
    ann.click("rlhf-pick-3", "rlhf-pick-1")  # clicks: 3 best, then 1 (2 is implied last)
    ann.shows("rlhf-ranking", "3 > 1 > 2")
    ann.shot("label-rank")
    ann.click("rlhf-submit")
    ann.at(1)
    ann.keys("2", "Enter")  # keys: the best only
    ann.at(2)
    ann.keys("t", "t")  # a tie; pressed twice, as a hurried labeler does: prompt 3, not yet shown, is not labelled
    ann.at(3)
    ann.keys("1", "3", "Backspace", "Backspace", "2")  # undo twice, then 1 > 2 (3 implied)
    ann.shows("rlhf-ranking", "1 > 2 > 3")
    ann.keys("Enter")
    ann.at(4)
    ann.keys("x")  # all bad
    ann.at(5)
    assert len(rows_of(out / LABELS_FILE)) == 5  # on disk already

    server.kill()  # SIGKILL halfway: nothing may be lost
    # as if the model had written HTML, Markdown and a javascript: link into a response still to be shown
    samples = rows_of(out / SAMPLES_FILE)
    samples[6]["responses"][1] = HOSTILE_RESPONSE
    (out / SAMPLES_FILE).write_text("".join(json.dumps(row) + "\n" for row in samples))
    server.restart().wait_ready()
    ann.start(server.url, "ann", 5)  # a reloaded page goes on at the first prompt not labelled
    ann.click("rlhf-skip")
    ann.at(6)
    assert ann.responses(["2"]) == [HOSTILE_RESPONSE]  # shown as the text it is
    assert page.evaluate("() => [typeof top.q, document.querySelectorAll('img[src=\"y\"], a[href^=\"javascript\"]')"
                         ".length]") == ["undefined", 0]
    ann.keys("2", "3", "Enter")
    ann.at(7)
    ann.click("rlhf-pick-1", "rlhf-submit")
    ann.at(8)
    ann.keys("s")
    ann.at(9)
    ann.keys("3", "Enter")
    page.get_by_text("Nothing left for you to label").wait_for(timeout=TIMEOUT)
    assert "10 of 10 prompts labelled" in page.inner_text(".rlhf-progress")
    stop(server)

    labels = rows_of(out / LABELS_FILE)
    assert [label["item"] for label in labels] == [f"{i:06d}" for i in range(10)]  # each once, none lost
    assert {label["labeler"] for label in labels} == {"ann"}
    assert [(label["decision"], label.get("ranking")) for label in labels] == [
        ("ranking", [2, 0, 1]), ("ranking", [1]), ("tie", None), ("ranking", [0, 1, 2]), ("bad", None),
        ("skip", None), ("ranking", [1, 2, 0]), ("ranking", [0]), ("skip", None), ("ranking", [2])]
    items = {row["item"]: Item.from_row(row) for row in rows_of(out / SAMPLES_FILE)}
    assert len(items) == 10  # sampled once each: the restart resampled nothing
    pairs = rows_of(out / PREFERENCES_FILE)
    assert pairs == [row for label in labels for row in preference_rows(items[label["item"]], label)]
    assert len(pairs) >= 10 and {"prompt", "chosen", "rejected", "chosen_rank", "rejected_rank"} <= set(pairs[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts_complete"] == 10 and summary["labels"] == 10 and summary["pairs"] == len(pairs)
    return out


def ab_session(browser, server: LabelServer, prompts: list[str], models: tuple[Path, Path], shots) -> None:
    out = server.output_dir
    server.wait_ready()
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    bob = Labeler(page, prompts, shots)
    bob.start(server.url, "bob", 0)
    html = page.content()
    assert all(str(model) not in html for model in models)  # which model is which stays on the server
    bob.shot("label-ab")
    bob.click("rlhf-a")
    for index, keys in ((1, ["b"]), (2, ["ArrowLeft"]), (3, ["ArrowRight"]), (4, ["t"])):
        bob.at(index)
        bob.keys(*keys)
    bob.at(5)
    server.kill()
    server.restart().wait_ready()
    bob.start(server.url, "bob", 5)
    bob.click("rlhf-bad")
    for index, keys in ((6, ["x"]), (7, ["s"]), (8, ["a"])):
        bob.at(index)
        bob.keys(*keys)
    bob.at(9)
    bob.click("rlhf-b")
    page.get_by_text("Nothing left for you to label").wait_for(timeout=TIMEOUT)
    stop(server)

    labels = rows_of(out / LABELS_FILE)
    assert [(label["item"], label["decision"], label.get("ranking")) for label in labels] == [
        (f"{i:06d}", decision, ranking) for i, (decision, ranking) in enumerate([
            ("ranking", [0, 1]), ("ranking", [1, 0]), ("ranking", [0, 1]), ("ranking", [1, 0]), ("tie", None),
            ("bad", None), ("bad", None), ("skip", None), ("ranking", [0, 1]), ("ranking", [1, 0])])]
    items = {row["item"]: row for row in rows_of(out / SAMPLES_FILE)}
    wins = sum(items[label["item"]]["models"][label["ranking"][0]] == "policy" for label in labels
               if label["decision"] == "ranking")
    rate = json.loads((out / "summary.json").read_text())["win_rates"]["policy"]
    assert rate["prompts"] == 9 and rate["win_rate"] == (wins + 0.5 * 3) / 9  # the tie and both-bad count half
    assert rate["low"] < rate["win_rate"] < rate["high"]


def other_model(model: Path, out: Path) -> Path:
    """A second policy for the A/B session: the tiny model with its weights perturbed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(7)
    other = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.add_(0.5 * torch.randn_like(parameter))
    other.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out
