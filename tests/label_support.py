"""What the `rlhf label` tests share: labelling runs built through the real store (no page), the label server as a
subprocess, and the rule for missing extras.

The label tests need Gradio (`pip install -e ".[label]"`); the browser test also needs playwright and a Chromium
(/usr/bin/chromium, or RLHF_CHROMIUM). They must run, in CI above all (.ci/run installs all three): a missing one
fails the test with the command that installs it. Only where RLHF_LABEL_TESTS_MAY_SKIP=1 is set, and never under
CI=1, do they skip instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, write_recipe

MAY_SKIP = "RLHF_LABEL_TESTS_MAY_SKIP"
CHROMIUM = os.environ.get("RLHF_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require(present: bool, what: str, install: str) -> None:
    """Fail (or, where RLHF_LABEL_TESTS_MAY_SKIP=1 and not in CI, skip) when `what` is missing."""
    if present:
        return
    message = f"{what} is missing: {install}"
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if os.environ.get(MAY_SKIP) == "1" and not in_ci:
        pytest.skip(f"{message} ({MAY_SKIP}=1)")
    pytest.fail(f"{message}. The label tests run everywhere, CI included (.ci/run installs it); set {MAY_SKIP}=1 "
                "to skip them on a machine without it (never in CI)", pytrace=False)


def require_gradio() -> None:
    require(importlib.util.find_spec("gradio") is not None, "Gradio (the `label` extra)",
            "pip install -e '.[label]' -c constraints.txt")


def require_browser() -> None:
    require_gradio()
    require(importlib.util.find_spec("playwright") is not None, "playwright (for Python)",
            "pip install playwright -c constraints.txt (no `playwright install`: the test drives the system's "
            "Chromium)")
    require(Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None, f"Chromium ({CHROMIUM})",
            "apt-get install -y chromium (or set RLHF_CHROMIUM to a Chromium binary)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def label_recipe(output_dir: Path, data: dict, model: Path | str, **extra: Any) -> dict[str, Any]:
    recipe = {"stage": "label", "seed": 0, "output_dir": str(output_dir), "policy": {"name_or_path": str(model)},
              "data": data, "responses_per_prompt": 3, "generation": {"response_length": 6}}
    recipe.update(extra)
    return recipe


def open_run(path: Path, recipe: dict[str, Any], planned: list[int]):
    """A labelling run started as `rlhf label` starts it (marker, resolved recipe), and its store."""
    from rlhf_pipeline import runs
    from rlhf_pipeline.label.serve import output_dir_state
    from rlhf_pipeline.label.store import LabelStore
    from rlhf_pipeline.recipe.load import load_recipe

    loaded = load_recipe(write_recipe(path, recipe))
    out = Path(loaded.recipe.output_dir)
    if output_dir_state(loaded) == "new":
        runs.start_run(runs.RunPlan(out, out, "new"), "label", loaded.resolved_yaml(runs.provenance()))
    r = loaded.recipe
    return loaded, LabelStore(out, r.mode, planned, r.seed, r.overlap, r.ahead)


class LabelServer:
    """`rlhf label RECIPE` in a subprocess (this checkout's code), started at once; its output goes to `log`."""

    def __init__(self, recipe: Path, log: Path, env: dict[str, str] | None = None):
        import yaml

        settings = yaml.safe_load(recipe.read_text())
        self.recipe, self.log, self.env = recipe, log, {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.output_dir = Path(settings["output_dir"])
        self.url = f"http://127.0.0.1:{settings['server']['port']}/"
        self.restart()

    def restart(self) -> LabelServer:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "rlhf_pipeline", "label", str(self.recipe)],
                                            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 120) -> LabelServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the label server exited ({self.process.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers (a login page, say)
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the label server did not answer within {timeout} s:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
