"""`rlhf label RECIPE`: check everything, load the models and prompts, start the sampler, serve the page.

Safe by default: the page listens on 127.0.0.1 (this machine only). Any other address needs a password, from the
environment (RLHF_LABEL_PASSWORD) or typed at the prompt; it is handed to Gradio's login and nothing else (never
written to the run, a recipe or a log). Labelers log in with their name and that password. Gradio's routes that read
or write files (file serving, uploads, the proxy, streams, run history, monitoring) are answered 404 before Gradio
sees the request; the page has no file component either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from rlhf_pipeline import runs
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.label.store import (
    LABELS_FILE,
    PREFERENCES_FILE,
    SAMPLES_FILE,
    SUMMARY_FILE,
    LabelStore,
    item_id,
)
from rlhf_pipeline.recipe.load import LoadedRecipe
from rlhf_pipeline.recipe.schema import LOOPBACK_HOSTS

PASSWORD_ENV = "RLHF_LABEL_PASSWORD"
MIN_PASSWORD = 8
INSTALL = "pip install 'rlhf-pipeline[label]'"
# recipe keys a labelling run may change between sessions: they do not change what is sampled or labelled
SESSION_KEYS = ("num_prompts", "overlap", "labelers", "ahead", "server", "hub", "output_dir")
# Gradio routes that read or write files, fetch URLs or record runs: none is needed by a page without file components
BLOCKED_ROUTES = ("/gradio_api/file", "/gradio_api/upload", "/gradio_api/proxy", "/gradio_api/stream",
                  "/gradio_api/process_recording", "/gradio_api/run-history", "/gradio_api/runs", "/gradio_api/vibe",
                  "/gradio_api/undo-vibe", "/gradio_api/dev", "/gradio_api/mcp", "/monitoring", "/file", "/upload",
                  "/proxy")


def require_gradio() -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"rlhf label serves its page with Gradio, which is not installed: {INSTALL}")


def models_of(recipe) -> dict[str, tuple[Any, str]]:
    """The models to sample from, by name, with the recipe key of each: `policy` (named "policy") or each of
    `policies`, then (A/B mode) `baseline`."""
    named = ({"policy": (recipe.policy, "policy")} if recipe.policy is not None
             else {name: (section, f"policies.{name}") for name, section in recipe.policies.items()})
    if recipe.baseline is not None:
        named["baseline"] = (recipe.baseline, "baseline")
    return named


def split_of(recipe) -> str:
    return recipe.split or ("train" if recipe.mode == "rank" else "held_out")


def password_for(host: str) -> str | None:
    """The labelers' password: RLHF_LABEL_PASSWORD, else typed at the prompt when the page is exposed beyond this
    machine (refused without a terminal to type it in); None on the loopback without RLHF_LABEL_PASSWORD."""
    secret = os.environ.get(PASSWORD_ENV)
    exposed = host not in LOOPBACK_HOSTS
    if secret is None and exposed:
        if not sys.stdin.isatty():
            raise UserError(f"server.host {host} exposes the labelling page to other machines, so it needs a "
                            f"password: set {PASSWORD_ENV} (read from the environment, never written anywhere), or "
                            "run from a terminal to type it; or serve on 127.0.0.1")
        import getpass

        secret = getpass.getpass(f"Password for the labelers (the page is exposed on {host}): ")
        if getpass.getpass("Again: ") != secret:
            raise UserError("the two passwords differ")
    if secret is not None and len(secret) < MIN_PASSWORD:
        raise UserError(f"the labelers' password ({PASSWORD_ENV} or typed) must be at least {MIN_PASSWORD} characters")
    return secret


def check_port(host: str, port: int | None) -> None:
    """A port given must be free (checked before any model loads; Gradio finds a free one itself otherwise)."""
    import socket

    if port is None:
        return
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (another server there? choose "
                        "another with --port or server.port)") from None


# -------------------------------------------------------------------------------------------------------------
# the run dir
# -------------------------------------------------------------------------------------------------------------
def output_dir_state(loaded: LoadedRecipe) -> str:
    """`new`, or `continue` (a labelling run of the same recipe: labelling goes on where it stopped). Anything else
    is refused: a link, a directory that is not a run of ours, another stage's run, labels of another recipe."""
    from rlhf_pipeline.recipe.load import diff_keys, resolved_data

    path = Path(loaded.recipe.output_dir)
    status = runs.output_dir_status(path)
    if status == "link":
        raise UserError(f"{path} is a symbolic link: rlhf never writes through a link; give the real directory")
    if status == "new":
        return "new"
    marker = runs.run_marker(path)
    if marker is None:
        raise UserError(f"{path} exists and is not an rlhf run directory (no {runs.MARKER_FILE}); refusing to write "
                        "into it. Choose another output_dir.")
    if marker.get("stage") != "label":
        raise UserError(f"{path} holds an `{marker.get('stage')}` run, not labels: choose another output_dir")
    saved = path / runs.RECIPE_FILE
    if not saved.is_file():
        raise UserError(f"{path} is a labelling run without its {runs.RECIPE_FILE}: cannot tell what it labels")
    changed = [key for key in diff_keys(resolved_data(saved.read_text()), resolved_data(loaded.resolved_yaml()))
               if key.split(".")[0] not in SESSION_KEYS]
    if changed:
        raise UserError(f"{path} holds labels of responses sampled with another recipe (it differs at: "
                        f"{', '.join(changed)}); labelling goes on only with the same prompts, models and sampling "
                        f"(`{', '.join(SESSION_KEYS[:5])}` may change). Label into another output_dir.")
    return "continue"


def check_stored_samples(loaded: LoadedRecipe, prompts, planned: list[int]) -> None:
    """The stored responses answer the prompts the recipe now gives, position by position (a data file edited
    between two sessions would attach old labels to new prompts)."""
    path = Path(loaded.recipe.output_dir) / SAMPLES_FILE
    wanted = {item_id(i): i for i in planned}
    for row in runs.read_jsonl(path):
        index = wanted.get(row.get("item"))
        if index is None:
            continue
        now = prompts.messages[index] if prompts.messages is not None else prompts.texts[index]
        if row.get("prompt") != now:
            raise loaded.error("data", f"prompt {index} is not the one labelled before ({path}): the data changed "
                                       "since the labelling started. Label the new data into another output_dir")


# -------------------------------------------------------------------------------------------------------------
# models and prompts
# -------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    tokenizer: Any
    prompts: Any  # Prompts of the labelled split
    models: dict[str, Any]  # name -> sampler.Model
    device: Any
    planned: list[int]  # the prompt positions to label, in order


def load_setup(loaded: LoadedRecipe) -> Setup:
    """Every model (on the accelerator when there is one), one tokenizer (the first model's, or the recipe's), and
    the prompts of the labelled split, tokenized as PPO tokenizes them (conversations through the chat template),
    leaving room for the longest response any model may write."""
    import torch

    from rlhf_pipeline import models as model_io
    from rlhf_pipeline.label.sampler import Model
    from rlhf_pipeline.recipe.load import LoadedRecipe as Loaded
    from rlhf_pipeline.stages.common import begin, context_length, say
    from rlhf_pipeline.stages.ppo import load_prompts

    recipe = loaded.recipe
    begin(loaded)
    named = models_of(recipe)
    first, first_key = next(iter(named.values()))
    tokenizer = model_io.load_tokenizer(loaded, recipe.tokenizer, first, model_key=f"{first_key}.name_or_path")
    device = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else torch.device("cpu")
    loaded_models = {}
    for name, (section, key) in named.items():
        say("label", f"loading {name}: {section.name_or_path}")
        model = model_io.load_pretrained(loaded, section, key=f"{key}.name_or_path").to(device).eval()
        model_io.align_special_tokens(model, tokenizer)
        loaded_models[name] = Model(name, model, section.generation or recipe.generation)
    context = min(context_length(m.model, cap=None) for m in loaded_models.values())
    longest = max(m.generation.response_length for m in loaded_models.values())
    budget = recipe.model_copy(update={"generation": recipe.generation.model_copy(
        update={"response_length": longest})})
    train, held_out = load_prompts(Loaded(loaded.path, budget, loaded.data, loaded.origins), tokenizer, context)
    prompts = train if split_of(recipe) == "train" else held_out
    count = min(recipe.num_prompts or len(prompts), len(prompts))
    return Setup(tokenizer, prompts, loaded_models, device, list(range(count)))


# -------------------------------------------------------------------------------------------------------------
# the command
# -------------------------------------------------------------------------------------------------------------
def run(loaded: LoadedRecipe, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    """Serve the labelling page until Ctrl-C; returns the run's summary."""
    from rlhf_pipeline.label.app import PageSettings
    from rlhf_pipeline.label.sampler import Sampler, sample_item
    from rlhf_pipeline.stages.common import say

    recipe = loaded.recipe
    host = host or recipe.server.host
    port = port if port is not None else recipe.server.port
    require_gradio()
    password = password_for(host)  # before anything loads
    check_port(host, port)
    output_dir = Path(recipe.output_dir)
    with runs.lock(output_dir):
        state = output_dir_state(loaded)
        setup = load_setup(loaded)
        check_stored_samples(loaded, setup.prompts, setup.planned)
        if state == "new":
            runs.start_run(runs.RunPlan(output_dir, output_dir, "new"), "label",
                           loaded.resolved_yaml(runs.provenance()))
        else:  # the session keys may have changed: the file says what this session labels with
            runs.atomic_write_text(output_dir / runs.RECIPE_FILE, loaded.resolved_yaml(runs.provenance()))
        store = LabelStore(output_dir, recipe.mode, setup.planned, recipe.seed, recipe.overlap, recipe.ahead)
        candidates = [name for name in setup.models if name != "baseline"]

        def sample(index: int, position: int):
            return sample_item(index, position, setup.prompts, setup.models, setup.tokenizer, recipe.mode,
                               recipe.responses_per_prompt, recipe.seed, setup.device, candidates)

        progress = store.progress()
        say("label", f"{recipe.mode} mode: {progress['total']} prompts ({progress['complete']} labelled, "
                     f"{len(store.items)} sampled) from {', '.join(setup.models)}; labels go to "
                     f"{output_dir / LABELS_FILE}")
        sampler = Sampler(store, setup.planned, sample)
        sampler.start()
        settings = PageSettings(recipe.mode, recipe.responses_per_prompt, recipe.labelers, password is not None)
        try:
            serve(store, settings, host, port, password)
        finally:
            store.stop()
            sampler.join(timeout=30)  # it stops after the prompt it is sampling
            store.close()
            summary = store.summary()
            runs.atomic_write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
            say("label", summary_text(summary, output_dir))
    return summary


def serve(store: LabelStore, settings, host: str, port: int | None, password: str | None) -> None:
    """Launch the page and keep it up until Ctrl-C (a kill loses nothing: every label is on disk)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # Gradio phones home otherwise
    import gradio as gr
    from starlette.middleware import Middleware

    from rlhf_pipeline.label.app import CSS, build_app, labeler_problem
    from rlhf_pipeline.stages.common import say

    demo = build_app(store, settings)
    auth = None
    if password is not None:
        secret = password.encode("utf-8")

        def auth(username: str, given: str) -> bool:
            right = hmac.compare_digest(given.encode("utf-8"), secret)
            return right and labeler_problem(username.strip(), settings.labelers) is None

    system = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]  # no web fonts: nothing is fetched
    theme = gr.themes.Default(font=system, font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "monospace"])
    try:
        _, url, _ = demo.launch(
            server_name=host, server_port=port, auth=auth, auth_message="Log in with your labeler name and the "
            "password you were given.", prevent_thread_lock=True, quiet=True, show_error=False, share=False,
            inbrowser=False, footer_links=[], run_history=False, allowed_paths=[], blocked_paths=[os.path.abspath(
                os.sep)], max_file_size=0, enable_monitoring=False, ssr_mode=False, pwa=False, mcp_server=False,
            theme=theme, css=CSS, js=demo.rlhf_keys_js, app_kwargs={"middleware": [Middleware(BlockedRoutes)]})
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port or 'a port from 7860'}: {exc}") from None
    say("label", f"labelling page: {url}" + (" (labelers log in with their name and the password)" if password
                                                else "") + "; Ctrl-C stops (every label is already saved)")
    try:
        while True:  # the server runs in its own threads; a sampling failure is printed by the sampler
            time.sleep(0.5)
    except KeyboardInterrupt:
        say("label", "stopping")
    finally:
        with contextlib.suppress(Exception):
            demo.close()


class BlockedRoutes:
    """ASGI middleware: Gradio's routes in BLOCKED_ROUTES answer 404 (HTTP) or close (websocket)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and blocked(scope.get("path", "")):
            if scope["type"] == "http":
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
                await send({"type": "http.response.body", "body": b"Not found"})
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


def blocked(path: str) -> bool:
    return re.sub(r"/+", "/", path).startswith(BLOCKED_ROUTES)


# -------------------------------------------------------------------------------------------------------------
# reporting
# -------------------------------------------------------------------------------------------------------------
def summary_text(summary: dict[str, Any], output_dir: Path) -> str:
    labelers = summary["labelers"]
    lines = [f"{summary['prompts_complete']} of {summary['prompts']} prompts labelled ({summary['labels']} labels by "
             f"{len(labelers)} labeler{'' if len(labelers) == 1 else 's'}); {summary['pairs']} preference pairs in "
             f"{output_dir / PREFERENCES_FILE}"]
    agreement = summary["agreement"]
    if agreement["units"]:
        alpha = agreement["krippendorff_alpha"]
        lines.append(f"agreement on {agreement['units']} shared judgements: {agreement['pairwise_agreement']:.3f} "
                     f"pairwise, Krippendorff's alpha {'n/a' if alpha is None else f'{alpha:.3f}'}")
    for name, rate in summary.get("win_rates", {}).items():
        lines.append(f"human win rate of {name} over the baseline: {rate['win_rate']:.3f} (95% Wilson interval "
                     f"{rate['low']:.3f}-{rate['high']:.3f}, {rate['prompts']} prompts)")
    return "\n  ".join(lines)


def describe(loaded: LoadedRecipe, host: str | None, port: int | None) -> str:
    """What `rlhf label` would do (no model is loaded, nothing is written)."""
    from rlhf_pipeline.commands import _data_rows

    recipe = loaded.recipe
    host = host or recipe.server.host
    state = output_dir_state(loaded)
    output_dir = Path(recipe.output_dir)
    if state == "continue":
        sampled = len(runs.read_jsonl(output_dir / SAMPLES_FILE))
        labels = len(runs.read_jsonl(output_dir / LABELS_FILE))
        status = f"continues: {labels} labels given, {sampled} prompts sampled"
    else:
        status = "new"
    rows = [("stage", "label"), ("recipe", str(loaded.path)), ("seed", str(recipe.seed)),
            ("output_dir", f"{output_dir} ({status})")]
    shown = (f"{recipe.responses_per_prompt} responses per prompt, ranked (pairs as in InstructGPT)"
             if recipe.mode == "rank" else "a policy's and the baseline's responses side by side, sides hidden")
    rows.append(("mode", f"{recipe.mode}: {shown}"))
    for name, (section, _) in models_of(recipe).items():
        generation = section.generation or recipe.generation
        rows.append((name, f"{section.name_or_path}: up to {generation.response_length} tokens, temperature "
                           f"{generation.temperature:g}, top_k {generation.top_k}, top_p {generation.top_p:g}"))
    rows.append(("prompts", f"the {split_of(recipe).replace('_', '-')} split, "
                            + (f"the first {recipe.num_prompts}" if recipe.num_prompts else "all")))
    rows.extend(_data_rows(recipe.data, "data", recipe.seed))
    rows.append(("labelers", (", ".join(recipe.labelers) if recipe.labelers else "any name")
                 + (f"; {recipe.overlap:g} of the prompts to two labelers" if recipe.overlap else "")))
    exposed = host not in LOOPBACK_HOSTS
    rows.append(("server", f"http://{host}:{port or recipe.server.port or '7860+'}"
                           + (f" (exposed: a password is needed, {PASSWORD_ENV} or typed)" if exposed
                              else " (this machine only)")))
    rows.append(("writes", f"{SAMPLES_FILE}, {LABELS_FILE}, {PREFERENCES_FILE} (TRL's prompt/chosen/rejected), "
                           f"{SUMMARY_FILE}, {runs.RECIPE_FILE}"))
    width = max(len(k) for k, _ in rows)
    return "dry run: nothing was written\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
