"""The labelling page (Gradio Blocks).

Safe by construction:
- model text (prompts, responses) is only ever the value of a read-only textbox: shown as text, never rendered as
  HTML or Markdown. The only HTML the page renders is the progress bar, made of integers;
- the page never learns which model wrote which response: the models stay in the server's store;
- no component reads or writes files, and `serve` blocks Gradio's file, upload, proxy and history routes;
- a label names the prompt the page showed (a hidden textbox read when the button is pressed), so a key pressed
  twice, or pressed while the next prompt loads, never labels a prompt the labeler has not seen (the second press
  finds the prompt already labelled, and writes nothing).
"""

# no `from __future__ import annotations`: Gradio finds the gr.Request parameter of a handler by its annotation
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.label.store import LabelStore, prompt_text

MAX_NAME = 64

# the keyboard: a key clicks the button of that id, unless the labeler is typing in an editable field
KEYS_JS = """
() => {
  const keys = %s;
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.target;
    const typing = target && (target.isContentEditable || ((target.tagName === "INPUT" || target.tagName === "TEXTAREA")
                                                           && !target.readOnly && !target.disabled));
    if (typing) return;
    const id = keys[event.key] || keys[event.key.toLowerCase()];
    const button = id && document.getElementById(id);
    if (!button || button.disabled) return;
    event.preventDefault();
    button.click();
  });
}
"""

CSS = """
.rlhf-progress progress { width: 60%; height: 1.1em; vertical-align: middle; margin-right: 0.8em;
                          accent-color: var(--color-accent); }
.rlhf-response textarea { font-family: ui-monospace, monospace; }
"""


@dataclass(frozen=True)
class PageSettings:
    mode: str  # "rank" or "ab"
    k: int  # responses per prompt
    labelers: list[str] | None  # the names allowed, or None for any
    authenticated: bool  # labelers log in (their login name is their labeler name)


def labeler_problem(name: str, allowed: list[str] | None) -> str | None:
    """Why `name` cannot label (None when it can)."""
    if not name:
        return "Type your name first: every label records who gave it."
    if len(name) > MAX_NAME:
        return f"A name is at most {MAX_NAME} characters."
    if allowed is not None and name not in allowed:
        return "This name is not among the labelers of this run (the recipe's `labelers`)."
    return None


def parse_ranking(text: str, k: int) -> list[int]:
    """`2 > 1 > 3` (response numbers as shown, best first) as response indices [1, 0, 2]."""
    parts = [part.strip() for part in (text or "").split(">") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise ValueError(f"not a ranking: {text!r}")
    return [int(part) - 1 for part in parts]


def build_app(store: LabelStore, settings: PageSettings, title: str = "rlhf label"):
    """The page, as a gr.Blocks (launched by `serve`)."""
    import gradio as gr

    rank = settings.mode == "rank"
    k = settings.k if rank else 2
    names = [str(j + 1) for j in range(k)] if rank else ["A", "B"]

    def progress_html(labeler: str | None) -> str:
        p = store.progress(labeler)
        return (f'<div class="rlhf-progress"><progress value="{int(p["complete"])}" max="{max(int(p["total"]), 1)}">'
                f'</progress>{int(p["complete"])} of {int(p["total"])} prompts labelled &middot; {int(p["mine"])} by '
                "you</div>")

    def view(labeler: str | None, status: str = "") -> dict:
        """Every output of the page for `labeler`'s next prompt (or why there is none)."""
        empty = {prompt: "", **{box: "" for box in responses}, shown: "", timer: gr.Timer(active=False)}
        if rank:
            empty[ranking] = ""
        if not labeler:
            return {**empty, progress: progress_html(None), message: status or START}
        item, state = store.next_item(labeler)
        out = {**empty, progress: progress_html(labeler), name: gr.Textbox(value=labeler, interactive=False),
               start: gr.Button(visible=False)}
        if item is None:
            text = {"waiting": WAITING, "failed": FAILED, "done": DONE}[state]
            return {**out, message: text, timer: gr.Timer(active=state == "waiting")}
        out.update({prompt: prompt_text(item.prompt), shown: item.item, message: status or READY[settings.mode]})
        out.update({box: text for box, text in zip(responses, item.responses)})
        return out

    def who(typed: str, request: gr.Request) -> str:
        """The labeler: the login name when labelers log in, else the name typed on the page."""
        if settings.authenticated:
            return (getattr(request, "username", None) or "").strip()
        return (typed or "").strip()

    def begin(typed: str, request: gr.Request) -> dict:
        labeler = who(typed, request)
        problem = labeler_problem(labeler, settings.labelers)
        return view(None, problem) if problem else view(labeler)

    def act(decision: str, read_ranking: bool = False) -> Callable:
        def handler(typed: str, item: str, ranked: str = "", request: gr.Request = None) -> dict:
            labeler = who(typed, request)
            if labeler_problem(labeler, settings.labelers) is not None or not item:
                return view(labeler if labeler else None)
            given = decision
            order: list[int] | None = None
            try:
                if decision == "ranking" and read_ranking:
                    order = parse_ranking(ranked, k)
                    if not order:
                        return {message: PICK_FIRST}
                elif decision in ("A", "B"):  # A/B: the side that won, over the other
                    order = [0, 1] if decision == "A" else [1, 0]
                    given = "ranking"
                store.record(labeler, item, given, order)
            except ValueError:  # a ranking the page cannot have sent, a closing server: nothing is written
                return {message: NOT_RECORDED}
            return view(labeler, SAVED)
        return handler

    def poll(typed: str, item: str, request: gr.Request) -> dict:
        labeler = who(typed, request)
        if item or labeler_problem(labeler, settings.labelers) is not None:
            return {timer: gr.Timer(active=False)}
        return view(labeler)

    keys: dict[str, str] = {}
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(HEADER[settings.mode].format(k=k))
        with gr.Row():
            name = gr.Textbox(label="Your name", placeholder="who is labelling", max_length=MAX_NAME, scale=4,
                              interactive=not settings.authenticated, elem_id="rlhf-name")
            start = gr.Button("Start", variant="primary", scale=1, elem_id="rlhf-start",
                              visible=not settings.authenticated)
        progress = gr.HTML(progress_html(None))
        message = gr.Markdown(START)
        prompt = gr.Textbox(label="Prompt", interactive=False, lines=2, max_lines=16, autoscroll=False,
                            elem_id="rlhf-prompt")
        shown = gr.Textbox(visible=False, elem_id="rlhf-item")
        responses, picks = [], []
        with gr.Row(equal_height=True):
            for label in names:
                with gr.Column(min_width=220):
                    responses.append(gr.Textbox(label=f"Response {label}", interactive=False, lines=4, max_lines=24,
                                                autoscroll=False, elem_id=f"rlhf-response-{label}",
                                                elem_classes="rlhf-response"))
                    if rank:
                        picks.append(gr.Button(f"{label}: next best", size="sm", elem_id=f"rlhf-pick-{label}"))
                        keys[label] = f"rlhf-pick-{label}"
        if rank:
            ranking = gr.Textbox(label=f"Your ranking, best first (keys 1-{k}; Backspace undoes)",
                                 interactive=False, elem_id="rlhf-ranking")
        buttons: list[tuple[Any, str]] = []
        with gr.Row():
            if rank:
                submit = gr.Button("Submit ranking (Enter)", variant="primary", elem_id="rlhf-submit")
                undo = gr.Button("Undo (Backspace)", elem_id="rlhf-undo")
                keys.update({"Enter": "rlhf-submit", "Backspace": "rlhf-undo"})
                buttons.append((submit, "ranking"))
            else:
                for side, keyset in (("A", ("a", "ArrowLeft")), ("B", ("b", "ArrowRight"))):
                    button = gr.Button(f"{side} is better ({side} or {'←' if side == 'A' else '→'})",
                                       variant="primary", elem_id=f"rlhf-{side.lower()}")
                    keys.update({key: f"rlhf-{side.lower()}" for key in keyset})
                    buttons.append((button, side))
            for text, decision, key in (("Tie (T)", "tie", "t"),
                                        (("All bad (X)" if rank and k > 2 else "Both bad (X)"), "bad", "x"),
                                        ("Skip (S)", "skip", "s")):
                button = gr.Button(text, elem_id=f"rlhf-{decision}")
                keys[key] = f"rlhf-{decision}"
                buttons.append((button, decision))
        timer = gr.Timer(1.0, active=False)

        outputs = [progress, message, prompt, shown, *responses, timer, name, start] + ([ranking] if rank else [])
        label_events = {"outputs": outputs, "concurrency_limit": 1, "concurrency_id": "label",
                        "show_progress": "hidden"}
        start.click(begin, [name], outputs, show_progress="hidden")
        name.submit(begin, [name], outputs, show_progress="hidden")
        if settings.authenticated:
            demo.load(begin, [name], outputs, show_progress="hidden")
        for button, decision in buttons:
            if decision == "ranking":
                button.click(act("ranking", read_ranking=True), [name, shown, ranking], **label_events)
            else:
                button.click(act(decision), [name, shown], **label_events)
        timer.tick(poll, [name, shown], outputs, show_progress="hidden")
        if rank:  # the ranking is built in the page itself: no round trip between a key and the next
            for j, button in enumerate(picks):
                button.click(None, [ranking, shown], [ranking], js=PICK_JS % (j + 1, k))
            undo.click(None, [ranking], [ranking], js=UNDO_JS)
    demo.rlhf_keys_js = KEYS_JS % json.dumps(keys)
    return demo


PICK_JS = """
(ranking, item) => {
  if (!item) return ranking;
  const picked = ranking ? ranking.split(" > ") : [];
  const choice = "%d", k = %d;
  if (!picked.includes(choice)) picked.push(choice);
  if (picked.length === k - 1) {  // the last one is implied
    for (let j = 1; j <= k; j++) if (!picked.includes(String(j))) picked.push(String(j));
  }
  return picked.join(" > ");
}
"""
UNDO_JS = """
(ranking) => {
  const picked = ranking ? ranking.split(" > ") : [];
  picked.pop();
  return picked.join(" > ");
}
"""

HEADER = {
    "rank": ("## Rank the responses\n"
             "Read the prompt and its {k} responses, then rank them from best to worst: press their numbers (or "
             "click **next best**) in order, best first, and submit with **Enter**. Submitting after the first pick "
             "says only which one is best. **T**: all equally good; **X**: all bad; **S**: skip this prompt. Every "
             "label is saved the moment you give it."),
    "ab": ("## Which response is better?\n"
           "Two models answered the prompt; which one wrote which response is hidden, and the sides are drawn at "
           "random. **A** or **←**: the left one is better; **B** or **→**: the right one; **T**: a tie; **X**: "
           "both bad; **S**: skip. Every label is saved the moment you give it."),
}
START = "Type your name and press **Start**."
READY = {"rank": "Rank the responses, best first.", "ab": "Which response is better?"}
SAVED = "Saved. Next prompt:"
PICK_FIRST = "Pick at least the best response first (its number), then submit."
WAITING = "The responses to the next prompt are being generated; it appears here as soon as it is ready."
DONE = "**Nothing left for you to label.** Thank you!"
NOT_RECORDED = "**Not recorded** (the server refused that label); nothing was saved for it."
FAILED = ("**Generating responses failed** (the server's log says why). The labels given so far are saved; nothing "
          "more can be labelled until the server is restarted.")

