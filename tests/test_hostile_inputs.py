"""The hostile-input corpus: what a careless user or an attacker can hand the CLI (recipes, --set values, data files,
reward functions, output dirs, checkpoints, model folders, plan inputs), each run through the installed `rlhf`
script as a user runs it. Every case must end with its exit code (2 for bad input), one line of error that names the
file or the key at fault, no traceback, and nothing changed on disk (the case's folder, the shared fixtures and HOME
are compared byte for byte before and after).

The cases are data (CASES below). Nearly all of them stop at `recipe validate`, `--dry-run` or `plan`, which import
no torch; the few marked `torch` go as far as a run's start (the output dir's lock) and cost a second or two each.
Damaged checkpoints, reward functions that misbehave while training and chat templates that fail as they are applied
need a model, and are tested beside the runs they damage (test_runs.py, test_rewards.py, test_bad_input.py).
"""

from __future__ import annotations

import gzip
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO

FIFO = object()  # a `files` value: make a named pipe there (reading it would block forever)


@dataclass(frozen=True)
class Resolved:
    """A `files` value: the case's r.yaml as a run started with it would have saved it (recipe.resolved.yaml), with
    these --set overrides."""

    overrides: tuple[str, ...] = ()


def rlhf_script() -> str:
    """The `rlhf` console script of the environment running the tests (CI installs the project editable)."""
    beside = Path(sys.executable).parent / "rlhf"
    found = str(beside) if beside.is_file() else shutil.which("rlhf")
    if found is None:
        pytest.fail("no `rlhf` script beside the Python running the tests, nor on PATH: pip install -e .")
    return found


# ---------------------------------------------------------------------------------------------------------------
# the shared world: a model folder (config.json only: nothing here loads weights), data, recipes, hostile files
# ---------------------------------------------------------------------------------------------------------------
CONFIG = '{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 400, "n_positions": 64}'
VOCAB_ONLY = '{"model": {"vocab": {"a": 0, "b": 1, "<|endoftext|>": 2}}, "added_tokens": []}'  # no ChatML markers
BOMB = "".join(f"{a}: &{a} [{', '.join([f'*{b}' if b else '1'] * 9)}]\n"
               for a, b in zip("abcdefghi", ["", *"abcdefgh"]))  # 9**9 values once expanded, in 9 lines

SFT = """\
stage: sft
seed: 0
output_dir: @CASE@/out
model: {name_or_path: @MODEL@}
data: {files: @DATA@/sft.jsonl, eval_size: 4}
training: {max_steps: 2, learning_rate: 1.0e-3}
"""
PPO = """\
stage: ppo
seed: 0
output_dir: @CASE@/out
policy: {name_or_path: @MODEL@}
reward: {model: @MODEL@}
data: {files: {train: @DATA@/prompts.jsonl, test: @DATA@/prompts.jsonl}, eval_split: test}
generation: {response_length: 8}
training: {total_episodes: 16, rollout_batch_size: 8, num_mini_batches: 2}
"""
EVAL = """\
stage: eval
seed: 0
output_dir: @CASE@/out
policies: {a: {name_or_path: @MODEL@}, b: {name_or_path: @MODEL@}}
baseline: {name_or_path: @MODEL@}
reward: {model: @MODEL@}
data: {files: {train: @DATA@/prompts.jsonl, test: @DATA@/prompts.jsonl}, eval_split: test}
"""
PIPELINE = """\
stage: pipeline
output_dir: @CASE@/runs
stages:
  sft: {recipe: @WORLD@/stages/sft.yaml}
  ppo: {recipe: @WORLD@/stages/ppo.yaml}
"""
ACCELERATE = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n"


@dataclass
class Case:
    id: str
    args: tuple[str, ...]  # after `rlhf`; @R is the case's recipe (r.yaml), @CASE@ its folder, @WORLD@ the world
    recipe: str | None = None  # r.yaml's text
    expect: tuple[str, ...] = ()  # in the error line (code 2) or in stdout (code 0); @HOME@ is HOME
    files: dict[str, object] = field(default_factory=dict)  # more files in the case's folder: text, bytes or FIFO
    code: int = 2
    env: dict[str, str | None] = field(default_factory=dict)  # None: unset
    torch: bool = False  # goes as far as a run's start: more lines on stderr (warnings), one of them the error
    absent: tuple[str, ...] = ()  # code 0: not in stdout


def sft(old: str = "", new: str = "") -> str:
    assert old in SFT, old
    return SFT.replace(old, new) if old else SFT


def ppo(old: str, new: str) -> str:
    assert old in PPO, old
    return PPO.replace(old, new)


def validate(id: str, text: str, *expect: str, **more) -> Case:
    return Case(id, ("recipe", "validate", "@R"), text, expect, **more)


def dry(id: str, text: str, *expect: str, stage: str = "sft", flags: tuple[str, ...] = (), **more) -> Case:
    return Case(id, (stage, "@R", "--dry-run", *flags), text, expect, **more)


def setting(id: str, value: str, *expect: str, stage: str = "sft", text: str = SFT, **more) -> Case:
    """A --set value, on --dry-run (which imports no torch)."""
    return Case(id, (stage, "@R", "--dry-run", "--set", value), text, expect, **more)


def plan(id: str, *flags: str, text: str = SFT, expect: tuple[str, ...] = (), **more) -> Case:
    return Case(id, ("plan", "@R", *flags), text, expect, **more)


def model_folder(id: str, files: dict[str, object], *expect: str) -> Case:
    """`rlhf plan` on a model folder holding `files`: the plan reads its config.json (and tokenizer.json)."""
    return Case(id, ("plan", "@R"), sft("@MODEL@", "@CASE@/model"), expect,
                files={f"model/{name}": content for name, content in files.items()})


def data_file(id: str, name: str, content: object, *expect: str, command: str = "plan", **more) -> Case:
    args = ("plan", "@R") if command == "plan" else ("sft", "@R", "--dry-run")
    return Case(id, args, sft("@DATA@/sft.jsonl", f"@CASE@/{name}"), expect, files={name: content}, **more)


def run_dir(status: str, recipe: object = SFT) -> dict[str, object]:
    """The files of a run dir `run/` of this tool: finished, or unfinished with a complete checkpoint."""
    files: dict[str, object] = {"run/.rlhf-run.json": '{"run_id": "r1", "stage": "sft"}',
                                "run/recipe.resolved.yaml": recipe}
    if status == "finished":
        files["run/metrics.json"] = '{"train_loss": 1.0}'
    else:
        files["run/checkpoint-2/.rlhf-complete"] = ""
    return files


RESUME = ("sft", "@R", "--dry-run", "--resume", "--output-dir", "@CASE@/run")
OFFLINE_TOKEN = {"HF_TOKEN": "hf_not_a_real_token", "HF_HUB_OFFLINE": "1"}
NO_TOKEN = {"HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None, "HF_HUB_OFFLINE": "0"}

CASES: list[Case] = [
    # --- recipe files: what is not a small YAML text -----------------------------------------------------------
    validate("bomb-validate", BOMB + "stage: sft\n", "r.yaml: refusing this YAML: more than 100,000 values"),
    Case("bomb-show", ("recipe", "show", "@R"), BOMB + "stage: sft\n", ("r.yaml", "alias bomb")),
    dry("bomb-dry-run", BOMB + "stage: sft\n", "r.yaml", "alias bomb"),
    plan("bomb-plan", text=BOMB + "stage: sft\n", expect=("r.yaml", "alias bomb")),
    Case("bomb-pipeline", ("pipeline", "@R", "--dry-run"), BOMB + "stage: pipeline\n", ("alias bomb",)),
    validate("recursive-alias", "stage: sft\nx: &a [*a]\n", "an anchor (`&name`) holds an alias to itself"),
    validate("anchors-within-limits-are-fine", sft("files: @DATA@/sft.jsonl, eval_size: 4", "files: {train: &f "
                                                   "@DATA@/sft.jsonl, test: *f}, eval_split: test"), "(sft)", code=0),
    Case("dev-zero-validate", ("recipe", "validate", "/dev/zero"), None, ("/dev/zero: cannot read recipe: not a "
                                                                          "regular file",)),
    Case("dev-zero-run", ("sft", "/dev/zero"), None, ("/dev/zero", "not a regular file")),
    Case("fifo-validate", ("recipe", "validate", "@CASE@/pipe.yaml"), None, ("pipe.yaml: cannot read recipe: not a "
                                                                            "regular file",),
         files={"pipe.yaml": FIFO}),
    Case("fifo-dry-run", ("sft", "@CASE@/pipe.yaml", "--dry-run"), None, ("pipe.yaml", "not a regular file"),
         files={"pipe.yaml": FIFO}),
    Case("fifo-plan", ("plan", "@CASE@/pipe.yaml"), None, ("pipe.yaml", "not a regular file"),
         files={"pipe.yaml": FIFO}),
    Case("fifo-show", ("recipe", "show", "@CASE@/pipe.yaml"), None, ("pipe.yaml", "not a regular file"),
         files={"pipe.yaml": FIFO}),
    Case("directory-recipe", ("sft", "@CASE@", "--dry-run"), None, ("cannot read recipe: it is a directory",)),
    Case("missing-recipe", ("sft", "@CASE@/nope.yaml"), None, ("nope.yaml: no such recipe file",)),
    validate("over-a-mebibyte", "stage: sft\n" + "#" * (1 << 20), "r.yaml: larger than any recipe"),
    validate("deep-list", "stage: sft\nx: " + "[" * 2000 + "]" * 2000 + "\n", "nested more than 64 levels deep"),
    validate("deep-mapping", "stage: sft\nx: " + "{a: " * 500 + "1" + "}" * 500 + "\n", "nested more than 64"),
    validate("integer-of-5000-digits", "stage: sft\nseed: " + "9" * 5000 + "\n", "an integer of more than 4,300"),
    validate("impossible-date", "stage: sft\nseed: 2024-13-45\n", "a value cannot be read: month must be in 1..12"),
    validate("nul-bytes", "stage: sft\n\x00\x01", "not a YAML text file: it holds NUL bytes"),
    Case("not-utf8", ("recipe", "validate", "@CASE@/r.yaml"), None, ("byte 0x89 at offset 0 is not UTF-8",),
         files={"r.yaml": b"\x89PNG\r\n\x1a\n"}),
    Case("utf16", ("recipe", "validate", "@CASE@/r.yaml"), None, ("r.yaml: not a YAML text file",),
         files={"r.yaml": "stage: sft\n".encode("utf-16")}),
    validate("control-character", "stage: sft\nseed: \x07\n", "r.yaml:2: invalid YAML"),
    validate("two-documents", SFT + "---\nstage: sft\n", "r.yaml:7: invalid YAML: but found another document"),
    validate("tab-indent", "stage: sft\n\tseed: 1\n", "r.yaml:2: invalid YAML"),
    validate("duplicate-key", SFT + "seed: 1\n", "r.yaml:7: seed: duplicate key"),
    validate("unhashable-key", "stage: sft\n? [a, b]\n: 1\n", "r.yaml:2: invalid YAML: found unhashable key"),
    validate("python-tag", "stage: !!python/object/apply:os.system ['touch pwned']\n", "could not determine a "
             "constructor"),
    validate("not-a-mapping", "- stage: sft\n", "r.yaml:1: a recipe is a mapping of keys to values"),
    validate("stage-is-a-list", "stage: [sft]\n", "r.yaml:1: stage: unknown stage ['sft']"),
    validate("stage-is-a-mapping", "stage: {sft: 1}\n", "r.yaml:1: stage: unknown stage {'sft': 1}"),
    Case("stage-is-a-list-run", ("sft", "@R"), "stage: [sft]\n", ("stage: unknown stage",)),
    validate("stage-is-a-number", "stage: 3\n", "stage: unknown stage 3"),
    validate("stage-misspelt", sft("stage: sft", "stage: stf"), "stage: unknown stage 'stf'; did you mean 'sft'?"),
    validate("stage-missing", "seed: 1\n", "stage: missing: every recipe names its stage"),
    Case("stage-for-another-command", ("ppo", "@R", "--dry-run"), SFT, ("stage: this is a `sft` recipe; run it "
                                                                        "with `rlhf sft`",)),
    validate("accelerate-config-as-recipe-is-fine-but-not-for-sft", ACCELERATE + "numprocesses: 2\n",
             "numprocesses: unknown key", "did you mean 'num_processes'?"),
    Case("accelerate-config-run-as-recipe", ("sft", "@R", "--dry-run"), ACCELERATE, ("this is an Accelerate config, "
                                                                                     "not a recipe",)),
    # --- extends -------------------------------------------------------------------------------------------------
    validate("extends-missing", SFT + "extends: nope.yaml\n", "r.yaml:7: extends: no such file"),
    validate("extends-itself", SFT + "extends: r.yaml\n", "extends: `extends` cycle"),
    validate("extends-a-directory", SFT + "extends: /tmp\n", "extends: no such file: /tmp"),
    validate("extends-dev-zero", SFT + "extends: /dev/zero\n", "extends: no such file: /dev/zero"),
    validate("extends-a-fifo", SFT + "extends: pipe.yaml\n", "extends: no such file", files={"pipe.yaml": FIFO}),
    validate("extends-a-mapping", SFT + "extends: {a: 1}\n", "extends: expected a path or a list of paths"),
    validate("extends-a-bomb", SFT + "extends: bomb.yaml\n", "bomb.yaml: refusing this YAML",
             files={"bomb.yaml": BOMB}),
    validate("extends-a-list-file", SFT + "extends: list.yaml\n", "list.yaml:1: a recipe is a mapping",
             files={"list.yaml": "- 1\n"}),
    validate("extends-too-deep", "extends: p1.yaml\n", "r.yaml: extends: `extends` goes more than 16 files deep",
             files={**{f"p{i}.yaml": f"extends: p{i + 1}.yaml\n" for i in range(1, 30)}, "p30.yaml": SFT}),
    validate("extends-fan-out-bomb", "extends: [p1.yaml, p1.yaml, p1.yaml, p1.yaml, p1.yaml, p1.yaml]\n",
             "r.yaml: extends: `extends` goes more than 64 recipe files in all",  # 6**7 reads, unchecked
             files={**{f"p{i}.yaml": f"extends: [{', '.join([f'p{i + 1}.yaml'] * 6)}]\n" for i in range(1, 7)},
                    "p7.yaml": SFT}),
    # --- seed ----------------------------------------------------------------------------------------------------
    validate("seed-negative", sft("seed: 0", "seed: -1"), "r.yaml:2: seed: Input should be greater than or equal "
             "to 0"),
    validate("seed-2-to-the-32", sft("seed: 0", "seed: 4294967296"), "r.yaml:2: seed: Input should be less than "
             "4294967296"),
    dry("seed-huge-dry-run", sft("seed: 0", "seed: 99999999999999999999"), "r.yaml:2: seed:"),
    validate("seed-text", sft("seed: 0", "seed: one"), "seed: Input should be a valid integer"),
    validate("seed-fraction", sft("seed: 0", "seed: 1.5"), "seed: Input should be a valid integer"),
    Case("pipeline-seed-negative", ("pipeline", "@R", "--dry-run"), PIPELINE + "seed: -1\n", ("r.yaml:6: seed:",)),
    # --- output_dir ----------------------------------------------------------------------------------------------
    validate("output-dir-empty", sft("@CASE@/out", "''"), "r.yaml:3: output_dir: expected a directory path"),
    validate("output-dir-nul", sft("@CASE@/out", '"a\\0b"'), "output_dir: a path cannot hold a NUL byte"),
    validate("output-dir-name-too-long", sft("@CASE@/out", "x" * 300), "output_dir: the name", "allows 255"),
    validate("output-dir-a-date", sft("@CASE@/out", "2024-01-01"), "output_dir: Input should be a valid string"),
    dry("output-dir-under-a-file", sft("@CASE@/out", "@CASE@/config.json/x"),
        "cannot write to", "config.json is a file, not a directory", files={"config.json": "{}"}),
    dry("output-dir-is-a-file", sft("@CASE@/out", "@CASE@/notes.txt"), "notes.txt exists and is not an rlhf run "
        "directory", files={"notes.txt": "mine"}),
    dry("output-dir-foreign", sft("@CASE@/out", "@CASE@/papers"), "papers exists and is not an rlhf run directory",
        files={"papers/thesis.tex": "precious"}),
    dry("output-dir-current-dir", sft("@CASE@/out", "."), ". exists and is not an rlhf run directory",
        files={"keep.txt": "x"}),
    dry("output-dir-a-link", sft("@CASE@/out", "@CASE@/link"), "link is a symbolic link", files={"link": "->papers",
                                                                                                "papers/a": "x"}),
    dry("output-dir-unquoted-tilde-is-null", sft("@CASE@/out", "~"), "r.yaml:3: output_dir: Input should be a valid "
        "string (got None)"),
    dry("output-dir-home", sft("@CASE@/out", "'~'"), "@HOME@ exists and is not an rlhf run directory"),
    dry("output-dir-tilde-expands", sft("@CASE@/out", "~/runs/sft"), "@HOME@/runs/sft (new)", code=0),
    Case("output-dir-flag-tilde-is-a-path", ("sft", "@R", "--dry-run", "--output-dir", "~"), SFT,
         ("is not an rlhf run directory",)),
    Case("output-dir-flag-yaml-mapping-is-a-path", ("sft", "@R", "--dry-run", "--output-dir", "a: b"), SFT,
         ("a: b (new)",), code=0),
    Case("output-dir-flag-null-is-a-path", ("sft", "@R", "--dry-run", "--output-dir", "null"), SFT, ("null (new)",),
         code=0),
    # over a run, a dry run plans as the run would with the flag it needs, and says so (it never refuses)
    dry("finished-run-without-overwrite", sft("@CASE@/out", "@CASE@/run"), "run (with --overwrite: holds a run:",
        "the run needs --overwrite: @CASE@/run holds a finished run", files=run_dir("finished"), code=0),
    dry("unfinished-run-with-checkpoint", sft("@CASE@/out", "@CASE@/run"), "run (with --overwrite: holds a run:",
        "the run needs --overwrite: @CASE@/run holds an unfinished run with checkpoint checkpoint-2: pass --resume",
        "--resume would be refused: --resume: the recipe differs", files=run_dir("unfinished"), code=0),
    dry("unfinished-run-with-checkpoint-same-recipe", sft("@CASE@/out", "@CASE@/run"),
        "run (with --resume: resumes from @CASE@/run/checkpoint-2)", "the run needs --resume or --overwrite:",
        files=run_dir("unfinished", Resolved(("output_dir=@CASE@/run",))), code=0),
    dry("finished-run-of-an-older-version", sft("@CASE@/out", "@CASE@/run"), "without the .rlhf-run.json marker",
        files={"run/recipe.resolved.yaml": SFT, "run/metrics.json": "{}"}),
    dry("resume-with-nothing-to-resume", SFT, "--resume:", "holds no unfinished run to resume", flags=("--resume",)),
    Case("output-dir-under-a-file-run", ("sft", "@R", "--output-dir", "@CASE@/config.json/x"), SFT,
         ("config.json is a file, not a directory",), files={"config.json": "{}"}, torch=True),
    Case("output-dir-in-proc-run", ("sft", "@R", "--output-dir", "/proc/no-such-process/x"), SFT,
         ("cannot create /proc/no-such-process",), torch=True),
    Case("refused-after-the-lock-leaves-no-empty-dirs", ("sft", "@R", "--output-dir", "@CASE@/new/a/b",
                                                         "--push-to-hub", "me/x"), SFT,
         ("hub.push: no Hugging Face token",), env=NO_TOKEN, torch=True),
    Case("foreign-output-dir-run", ("sft", "@R", "--output-dir", "@CASE@/papers"), SFT,
         ("papers exists and is not an rlhf run directory",), files={"papers/thesis.tex": "precious"}, torch=True),
    # --- resuming: the recipe the run started with -----------------------------------------------------------
    Case("resume-a-changed-recipe", RESUME, SFT, ("differs from the one the run started with", "training.max_steps"),
         files=run_dir("unfinished", Resolved(("output_dir=@CASE@/run", "training.max_steps=3")))),
    Case("resume-a-garbage-resolved-recipe", RESUME, SFT, ("run/recipe.resolved.yaml: cannot be read as a recipe",),
         files=run_dir("unfinished", "stage: [sft\n")),
    Case("resume-a-bomb-resolved-recipe", RESUME, SFT, ("recipe.resolved.yaml: cannot be read as a recipe",
                                                        "alias bomb"), files=run_dir("unfinished", BOMB)),
    Case("resume-a-list-resolved-recipe", RESUME, SFT, ("recipe.resolved.yaml: cannot be read as a recipe: it is "
                                                        "not a mapping",), files=run_dir("unfinished", "- 1\n")),
    Case("resume-a-finished-run", RESUME, SFT, ("--resume:", "it is finished"), files=run_dir("finished")),
    Case("resume-from-an-incomplete-checkpoint", ("sft", "@R", "--dry-run", "--output-dir", "@CASE@/run", "--set",
                                                  "training.resume_from_checkpoint=@CASE@/run/checkpoint-9"), SFT,
         ("training.resume_from_checkpoint:", "is not a complete checkpoint of this run"),
         files=run_dir("unfinished")),
    Case("resume-the-same-dir-spelt-otherwise", ("sft", "@R", "--dry-run", "--resume", "--output-dir",
                                                 "@CASE@/./run"), SFT, ("resumes from",), code=0,
         files=run_dir("unfinished", Resolved(("output_dir=@CASE@/run",)))),
    # --- training values -------------------------------------------------------------------------------------
    validate("learning-rate-nan", sft("1.0e-3", ".nan"), "training.learning_rate: expected a finite number"),
    validate("learning-rate-negative", sft("1.0e-3", "-1"), "training.learning_rate: expected a finite number >= 0"),
    validate("unknown-training-key", sft("learning_rate", "learnin_rate"), "training.learnin_rate: unknown key for "
             "trl.SFTConfig; did you mean 'learning_rate'?"),
    validate("trl-name-for-ours", sft("max_steps: 2", "max_steps: 2, lora_alpha: 8"), "did you mean 'peft.alpha'?"),
    validate("training-is-a-list", sft("training: {max_steps: 2, learning_rate: 1.0e-3}", "training: [1]"),
             "training: Input should be a valid dictionary"),
    validate("save-steps-null-where-nothing-set-it-is-fine-but-zero-is-not", sft("max_steps: 2", "save_steps: 0"),
             "training.save_steps: expected a number > 0"),
    validate("unknown-top-key", SFT + "trainig: {}\n", "trainig: unknown key; did you mean 'training'?"),
    validate("peft-rank-zero", SFT + "peft: {r: 0}\n", "peft.r: Input should be greater than or equal to 1"),
    validate("data-two-sources", sft("files: @DATA@/sft.jsonl", "files: @DATA@/sft.jsonl, dataset: x/y"),
             "set exactly one of `dataset`"),
    validate("data-bad-suffix", sft("@DATA@/sft.jsonl", "@DATA@/sft.docx"), "data.files: ",
             "expected a .jsonl, .json, .csv, .parquet, .txt file"),
    validate("data-bad-split-slice", sft("eval_size: 4", "eval_split: 'test[:x]'"), "data.eval_split:",
             "is not a split"),
    # --- chat templates ------------------------------------------------------------------------------------------
    setting("chat-template-typo", "tokenizer.chat_template=chatmll", "tokenizer.chat_template: not `chatml`",
            "did you mean 'chatml'?"),
    setting("chat-template-missing-file", "tokenizer.chat_template=nope.jinja", "tokenizer.chat_template: no such "
            "file: nope.jinja"),
    Case("chat-template-not-utf8", ("sft", "@R", "--dry-run", "--set", "tokenizer.chat_template=@CASE@/t.jinja"), SFT,
         ("tokenizer.chat_template:", "t.jinja: not a UTF-8 text file: byte 0xff"), files={"t.jinja": b"\xff{{ x }}"}),
    Case("chat-template-a-fifo", ("sft", "@R", "--dry-run", "--set", "tokenizer.chat_template=@CASE@/t.jinja"), SFT,
         ("tokenizer.chat_template:", "t.jinja is not a regular file"), files={"t.jinja": FIFO}),
    Case("chatml-with-lora", ("sft", "@R", "--dry-run", "--set", "tokenizer.chat_template=chatml", "--set", "peft.r=4"),
         sft("@MODEL@", "@WORLD@/vocab-model"), ("peft: `tokenizer.chat_template: chatml` adds tokens the model has "
                                                 "no embedding for",)),
    Case("chatml-in-ppo", ("ppo", "@R", "--dry-run", "--set", "tokenizer.chat_template=chatml"),
         ppo("policy: {name_or_path: @MODEL@}", "policy: {name_or_path: @WORLD@/vocab-model}"),
         ("tokenizer.chat_template: the policy's vocabulary lacks ChatML's markers",)),
    # --- reward functions: what can be told without running them ---------------------------------------------
    setting("reward-function-missing-file", "reward={function: nope.py:score}", "reward.function: 'nope.py:score': "
            "no such file nope.py", stage="ppo", text=PPO),
    setting("reward-function-missing-module", "reward={function: no_such_module.x:score}", "reward.function:",
            "no module 'no_such_module'", stage="ppo", text=PPO),
    setting("reward-function-no-colon", "reward={function: score}", "reward: `function` is `module:function` or "
            "`file.py:function` (got 'score')", stage="ppo", text=PPO),
    setting("reward-function-no-name", "reward={function: 'mod.py:'}", "reward.function:", "expected `module:function`",
            stage="ppo", text=PPO),
    setting("reward-function-bad-name", "reward={function: 'rewards.py:not a name'}", "reward.function:",
            stage="ppo", text=PPO),
    setting("reward-function-directory", "reward={function: 'pkg.py:score'}", "reward.function:",
            "no such file pkg.py", stage="ppo", text=PPO, files={"pkg.py/x": ""}),
    setting("gold-function-missing-file", "gold={function: gold.py:score}", "gold.function: 'gold.py:score': no "
            "such file", stage="ppo", text=PPO),
    setting("reward-model-and-function", "reward={model: m, function: f.py:g}", "reward:", stage="ppo", text=PPO),
    Case("eval-reward-function-missing", ("eval", "@R", "--dry-run"), EVAL.replace("reward: {model: @MODEL@}",
                                                                                    "reward: {function: n.py:f}"),
         ("reward.function: 'n.py:f': no such file",)),
    # --- rlhf eval: names that collide in eval.json ----------------------------------------------------------
    Case("eval-names-prefix", ("eval", "@R", "--dry-run"), EVAL.replace("b: {", "a_gold: {"),
         ("policies: the names 'a' and 'a_gold' collide in eval.json", "e.g. a-gold")),
    Case("eval-name-reward", ("eval", "@R", "--dry-run"), EVAL.replace("b: {", "reward: {"),
         ("policies: 'reward' cannot name a policy",)),
    Case("eval-name-prompt", ("recipe", "validate", "@R"), EVAL.replace("b: {", "prompt: {"),
         ("policies: 'prompt' cannot name a policy",)),
    Case("eval-name-baseline-prefix", ("recipe", "validate", "@R"), EVAL.replace("b: {", "baseline_2: {"),
         ("the names 'baseline' and 'baseline_2' collide",)),
    Case("eval-name-baseline", ("recipe", "validate", "@R"), EVAL.replace("b: {", "baseline: {"),
         ("'baseline' is not a usable name",)),
    Case("eval-name-odd-characters", ("recipe", "validate", "@R"), EVAL.replace("b: {", "'a/b': {"),
         ("'a/b' is not a usable name",)),
    Case("eval-policy-and-policies", ("recipe", "validate", "@R"), EVAL + "policy: {name_or_path: x}\n",
         ("give `policy` (one) or `policies` (several, by name), not both",)),
    Case("eval-no-held-out", ("recipe", "validate", "@R"), EVAL.replace(", eval_split: test", ""),
         ("`data`: set `eval_split` or `eval_size`",)),
    # --- pipelines -----------------------------------------------------------------------------------------------
    Case("pipeline-set-extends", ("pipeline", "@R", "--dry-run"),
         PIPELINE.replace("stages/sft.yaml}", "stages/sft.yaml, set: {extends: x.yaml}}"),
         ("stages.sft.set.extends: `extends` is read from the recipe file only",)),
    Case("pipeline-policy-names-collide", ("pipeline", "@R", "--dry-run"),
         PIPELINE + "  policies: {ppo_gold: {recipe: @WORLD@/stages/ppo.yaml}}\n  eval: {}\n",
         ("stages.policies: the names 'ppo' and 'ppo_gold' collide in eval.json",)),
    Case("pipeline-stage-recipe-a-fifo", ("pipeline", "@R", "--dry-run"),
         PIPELINE.replace("@WORLD@/stages/sft.yaml", "pipe.yaml"), ("stages.sft.recipe: no such file",),
         files={"pipe.yaml": FIFO}),
    Case("pipeline-stage-recipe-dev-zero", ("recipe", "validate", "@R"),
         PIPELINE.replace("@WORLD@/stages/sft.yaml", "/dev/zero"), ("stages.sft.recipe: no such file: /dev/zero",)),
    Case("pipeline-stage-recipe-a-bomb", ("pipeline", "@R", "--dry-run"),
         PIPELINE.replace("@WORLD@/stages/sft.yaml", "bomb.yaml"), ("bomb.yaml: refusing this YAML",),
         files={"bomb.yaml": BOMB}),
    Case("pipeline-policy-recipe-stage-list", ("pipeline", "@R", "--dry-run"),
         PIPELINE + "  policies: {x: {recipe: l.yaml}}\n", ("stages.policies.x.recipe:", "a policy stage runs a ppo "
                                                           "or dpo recipe"), files={"l.yaml": "stage: [ppo]\n"}),
    Case("pipeline-order", ("recipe", "validate", "@R"),
         "stage: pipeline\noutput_dir: runs\nstages:\n  ppo: {recipe: @WORLD@/stages/ppo.yaml}\n"
         "  sft: {recipe: @WORLD@/stages/sft.yaml}\n", ("stages: stages run in the order",)),
    Case("pipeline-set-key-holds-a-value", ("pipeline", "@R", "--dry-run"),
         PIPELINE.replace("stages/sft.yaml}", "stages/sft.yaml, set: {model.name_or_path.x: 1}}"),
         ("`model.name_or_path` holds a value",)),
    Case("pipeline-gate-out-of-range", ("recipe", "validate", "@R"), PIPELINE + "gate: {min_reward_accuracy: 2}\n",
         ("gate.min_reward_accuracy: Input should be less than or equal to 1",)),
    # --- the Hub ---------------------------------------------------------------------------------------------
    Case("push-to-hub-offline", ("sft", "@R", "--dry-run", "--push-to-hub", "me/tiny"), SFT,
         ("hub.push: HF_HUB_OFFLINE is set",), env=OFFLINE_TOKEN),
    Case("push-to-hub-without-a-token", ("sft", "@R", "--dry-run", "--push-to-hub", "me/tiny"), SFT,
         ("hub.push: no Hugging Face token",), env=NO_TOKEN),
    Case("hub-push-in-recipe-offline", ("ppo", "@R", "--dry-run"), PPO + "hub: {repo_id: me/x, push: true}\n",
         ("hub.push: HF_HUB_OFFLINE is set",), env=OFFLINE_TOKEN),
    Case("pipeline-hub-push-offline", ("pipeline", "@R", "--dry-run"), PIPELINE + "hub: {repo_prefix: me/x, push: "
                                                                                  "true}\n",
         ("hub.push: HF_HUB_OFFLINE is set",), env=OFFLINE_TOKEN),
    Case("push-to-hub-bad-repo", ("sft", "@R", "--dry-run", "--push-to-hub", "no-namespace"), SFT,
         ("invalid --push-to-hub repo id 'no-namespace'",)),
    validate("hub-push-without-repo", SFT + "hub: {push: true}\n", "hub: `push: true` needs `repo_id`"),
    validate("hub-repo-id-dots", SFT + "hub: {repo_id: 'a/..'}\n", "hub.repo_id: expected `namespace/name`"),
    # --- recipe keys -------------------------------------------------------------------------------------------
    Case("keys-unknown-stage", ("recipe", "keys", "nope"), None, ("unknown stage 'nope'",)),
    Case("keys-unknown-section", ("recipe", "keys", "sft", "trainin"), None, ("sft recipes have no section "
                                                                             "'trainin'",)),
]

# --- --set values (on --dry-run) -----------------------------------------------------------------------------------
CASES += [
    setting("set-no-key", "=1", "expected KEY=VALUE"),
    setting("set-empty-part", "a..b=1", "expected KEY=VALUE with a dotted key"),
    setting("set-unclosed-list", "data.files=[a", "cannot read the value:", "(line 1, column 3)"),
    setting("set-undefined-alias", "seed=*a", "cannot read the value: found undefined alias 'a'"),
    setting("set-recursive-alias", "x=&a [*a]", "refusing the value: an anchor"),
    setting("set-alias-bomb", "x={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
            "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
            "e: [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]}", "refusing the value: more than 100,000 values"),
    setting("set-deep", "x=" + "[" * 200 + "]" * 200, "refusing the value: nested more than 64 levels deep"),
    setting("set-extends", "extends=other.yaml", "`extends` is read from the recipe file only"),
    setting("set-extends-list", "extends=[a.yaml, b.yaml]", "`extends` is read from the recipe file only"),
    setting("set-seed-negative", "seed=-1", "seed: Input should be greater than or equal to 0"),
    setting("set-seed-too-big", "seed=4294967296", "seed: Input should be less than 4294967296"),
    setting("set-seed-nan", "seed=!!float nan", "seed: Input should be a finite number"),
    setting("set-model-a-number", "model=3", "model: Input should be a valid dictionary"),
    setting("set-into-a-value", "model.name_or_path.x=1", "`model.name_or_path` holds a value"),
    setting("set-training-null-unsets-it", "training=null", "training    library defaults", code=0),
    setting("set-save-steps-inf", "training.save_steps=1e999", "training.save_steps: expected a finite number"),
    setting("set-batch-a-float", "training.per_device_train_batch_size=1e10",
            "training.per_device_train_batch_size: expected int"),
    setting("set-seed-in-training", "training.seed=1", "training.seed: not set here: set `seed`"),
    setting("set-output-dir-in-training", "training.output_dir=/x", "training.output_dir: not set here"),
    setting("set-push-to-hub-in-training", "training.push_to_hub=true", "training.push_to_hub: not set here: set "
            "`hub.push`"),
    setting("set-stage", "stage=ppo", "stage: this is a `ppo` recipe"),
    setting("set-output-dir-empty", "output_dir=", "output_dir: Input should be a valid string"),
    setting("set-output-dir-blank", "output_dir=' '", "output_dir: expected a directory path"),
    setting("set-files-empty-list", "data.files=[]", "data.files: split 'train': expected a path or a non-empty"),
    setting("set-files-empty-split", "data.files={train: }", "data.files: split 'train'"),
    setting("set-files-empty-mapping", "data.files={}", "data.files: expected a path", "(got an empty mapping)",
            stage="ppo", text=PPO),
    setting("set-provenance", "provenance=1", "provenance: Input should be a valid dictionary"),
    setting("set-hub-push-alone", "hub.push=true", "hub: `push: true` needs `repo_id`"),
    setting("set-report-to-typo", "training.report_to=wandbb", "training.report_to: unknown tracker 'wandbb'"),
    setting("set-binary", "x=!!binary aGVsbG8=", "x: unknown key"),
    setting("set-learning-rate-inf", "training.learning_rate=.inf", "expected a finite number (got inf)"),
    setting("set-lora-no-modules", "peft.target_modules=[]", "peft.target_modules: expected `all-linear`"),
    setting("set-eval-size-fraction-above-one", "data.eval_size=1.5", "data: `eval_size` is a fraction below 1"),
    setting("set-ppo-episodes-not-a-multiple", "training.total_episodes=20", "training.total_episodes: 20 must be a "
            "multiple of rollout_batch_size", stage="ppo", text=PPO),
    setting("set-ppo-kl-nan", "training.kl_coef=.nan", "training.kl_coef:", stage="ppo", text=PPO),
    setting("set-ppo-estimator-typo", "training.advantage_estimator=rlooo", "training.advantage_estimator:",
            stage="ppo", text=PPO),
    setting("set-ppo-value-for-rloo", "training.advantage_estimator=rloo", "samples_per_prompt to 2 or more",
            stage="ppo", text=PPO),
    setting("set-generation-temperature-zero", "generation.temperature=0", "generation.temperature:", stage="ppo",
            text=PPO),
    Case("set-save-steps-null-unsets-an-inherited-key", ("recipe", "show", "@R", "--set", "training.save_steps=null"),
         "extends: parent.yaml\n", ("max_steps: 2",), code=0, absent=("save_steps",),
         files={"parent.yaml": sft("max_steps: 2", "max_steps: 2, save_steps: 5")}),
    Case("null-for-a-key-that-takes-null-stays", ("recipe", "show", "@R", "--set", "training.max_length=null"), SFT,
         ("max_length: null",), code=0),
]

# --- data files ----------------------------------------------------------------------------------------------------
CASES += [
    data_file("data-not-gzip", "d.jsonl.gz", b"\x00\x01 not gzip", "d.jsonl.gz: cannot be read: Not a gzipped file"),
    data_file("data-truncated-gzip", "d.jsonl.gz", gzip.compress(b'{"prompt": "a", "completion": "b"}\n' * 50)[:30],
              "d.jsonl.gz: cannot be read"),
    data_file("data-not-utf8", "d.jsonl", b'\xff\xfe{"prompt": "a"}\n', "d.jsonl:1: not UTF-8 text (byte 0xff"),
    data_file("data-bad-json-line", "d.jsonl", '{"prompt": "a", "completion": "b"}\nnot json\n', "d.jsonl:2: not JSON"),
    data_file("data-truncated-json", "d.json", '{"prompt":', "d.json:1: not JSON"),
    data_file("data-empty", "d.jsonl", "", "d.jsonl is empty: no rows"),
    data_file("data-blank-lines-only", "d.jsonl", "\n\n  \n", "d.jsonl is empty: no rows"),
    data_file("data-json-columns-not-all-lists", "d.json", '{"prompt": ["a", "b"], "completion": 1}', "plan: ",
              code=0),  # not rows the plan can measure: planned without them (the run says what is wrong)
    data_file("data-a-fifo", "d.jsonl", FIFO, "data.files: ", "d.jsonl is not a regular file", command="dry-run"),
    data_file("data-a-directory", "d.jsonl", None, "data.files: ", "d.jsonl is a directory", command="dry-run"),
    dry("data-missing", sft("@DATA@/sft.jsonl", "@CASE@/absent.jsonl"), "data.files: no such file:"),
    data_file("data-fifo-plan", "d.jsonl", FIFO, "d.jsonl is not a regular file"),
    Case("data-missing-split", ("sft", "@R", "--dry-run"), sft("files: @DATA@/sft.jsonl, eval_size: 4",
                                                               "files: {train: @DATA@/sft.jsonl}, eval_split: tset"),
         ("data.eval_split: no split 'tset' among data.files (train)",)),
    Case("data-missing-split-did-you-mean", ("sft", "@R", "--dry-run"),
         sft("files: @DATA@/sft.jsonl, eval_size: 4", "files: {train: @DATA@/sft.jsonl, test: @DATA@/sft.jsonl}, "
                                                      "eval_split: tset"), ("did you mean 'test'?",)),
    Case("data-mixture-fraction-on-some", ("sft", "@R", "--dry-run"),
         sft("files: @DATA@/sft.jsonl, eval_size: 4", "datasets: [{data_files: @DATA@/sft.jsonl, fraction: 0.5}, "
                                                      "{data_files: @DATA@/sft.jsonl}], eval_size: 4"),
         ("data.datasets.1: no `fraction`",)),
    Case("data-mixture-missing-file", ("sft", "@R", "--dry-run"),
         sft("files: @DATA@/sft.jsonl, eval_size: 4", "datasets: [{data_files: nope.jsonl}], eval_size: 4"),
         ("data.datasets.0.data_files: no such file: nope.jsonl",)),
    Case("preferences-missing", ("eval", "@R", "--dry-run"),
         EVAL + "preferences: {files: {train: nope.jsonl, test: nope.jsonl}, eval_split: test}\n",
         ("preferences.files: no such file: nope.jsonl",)),
]

# --- model folders, as `rlhf plan` reads them (config.json, adapter_config.json, tokenizer.json) -------------------
CASES += [
    model_folder("config-empty", {"config.json": ""}, "model/config.json: not a readable JSON config: it is empty"),
    model_folder("config-garbage", {"config.json": "{nope"}, "model/config.json: not a readable JSON config"),
    model_folder("config-a-list", {"config.json": "[1, 2]"}, "config.json: expected a JSON object of settings (got "
                                                             "list)"),
    model_folder("config-null", {"config.json": "null"}, "expected a JSON object of settings (got NoneType)"),
    model_folder("config-not-utf8", {"config.json": b"\xff\xfe"}, "config.json: not a readable JSON config"),
    model_folder("config-layers-text", {"config.json": CONFIG.replace('"n_layer": 2', '"n_layer": "x"')},
                 "config.json: n_layer: expected a whole number > 0 (got 'x')"),
    model_folder("config-layers-huge-float", {"config.json": CONFIG.replace('"n_layer": 2', '"n_layer": 1e308')},
                 "n_layer: expected a whole number > 0"),
    model_folder("config-layers-nan", {"config.json": CONFIG.replace('"n_layer": 2', '"n_layer": NaN')},
                 "n_layer: expected a whole number > 0 (got nan)"),
    model_folder("config-layers-bool", {"config.json": CONFIG.replace('"n_layer": 2', '"n_layer": true')},
                 "n_layer: expected a whole number > 0 (got True)"),
    model_folder("config-layers-negative", {"config.json": CONFIG.replace('"n_layer": 2', '"n_layer": -1')},
                 "n_layer: expected a whole number > 0 (got -1)"),
    model_folder("config-heads-zero", {"config.json": CONFIG.replace('"n_head": 2', '"n_head": 0')},
                 "n_head: expected a whole number > 0 (got 0)"),
    model_folder("config-vocab-fraction", {"config.json": CONFIG.replace('"vocab_size": 400', '"vocab_size": 4.5')},
                 "vocab_size: expected a whole number > 0"),
    model_folder("config-dropout-text", {"config.json": CONFIG[:-1] + ', "resid_pdrop": "x"}'},
                 "resid_pdrop: expected a number in [0, 1)"),
    model_folder("config-no-layers", {"config.json": '{"model_type": "gpt2"}'}, "config.json has none of n_layer"),
    model_folder("config-a-directory", {"config.json/x": ""}, "model.name_or_path: cannot tell the shape"),
    model_folder("adapter-garbage", {"adapter_config.json": "{nope"},
                 "adapter_config.json: not a readable JSON config"),
    model_folder("adapter-a-list", {"adapter_config.json": "[]"}, "adapter_config.json: expected a JSON object"),
    model_folder("tokenizer-garbage", {"config.json": CONFIG, "tokenizer.json": "garbage"},
                 "tokenizer.json: not a tokenizer the tokenizers library can read"),
    model_folder("tokenizer-a-list", {"config.json": CONFIG, "tokenizer.json": "[1]"}, "tokenizer.json: not a "
                                                                                      "tokenizer"),
    Case("model-missing-plan", ("plan", "@R"), sft("@MODEL@", "@CASE@/nope"), ("model.name_or_path: cannot tell the "
                                                                              "shape",)),
]

# --- plan's own inputs ---------------------------------------------------------------------------------------------
CASES += [
    plan("plan-device-memory-words", "--device-memory", "lots", expect=("--device-memory: expected a positive size",)),
    plan("plan-device-memory-negative", "--device-memory", "-5GB", expect=("--device-memory:",)),
    plan("plan-device-memory-infinite", "--device-memory", "1e999GB", expect=("--device-memory:",)),
    plan("plan-device-memory-nan", "--device-memory", "nanGB", expect=("--device-memory:",)),
    plan("plan-processes-zero", "--processes", "0", expect=("--processes: expected 1 or more",)),
    plan("plan-processes-negative", "--processes", "-2", expect=("--processes: expected 1 or more",)),
    plan("plan-accelerate-missing", "--accelerate-config", "nope.yaml", expect=("--accelerate-config: no such file",)),
    plan("plan-accelerate-fifo", "--accelerate-config", "@CASE@/pipe.yaml", expect=("--accelerate-config: no such",),
         files={"pipe.yaml": FIFO}),
    plan("plan-accelerate-dev-zero", "--accelerate-config", "/dev/zero", expect=("--accelerate-config: no such",)),
    plan("plan-accelerate-bomb", "--accelerate-config", "@CASE@/acc.yaml", expect=("acc.yaml: refusing this YAML",),
         files={"acc.yaml": BOMB}),
    plan("plan-accelerate-garbage", "--accelerate-config", "@CASE@/acc.yaml", expect=("acc.yaml:2: invalid YAML",),
         files={"acc.yaml": "distributed_type: [MULTI_GPU\n"}),
    plan("plan-accelerate-type-list", "--accelerate-config", "@CASE@/acc.yaml",
         expect=("acc.yaml:1: distributed_type: expected one of",), files={"acc.yaml": "distributed_type: [1]\n"}),
    plan("plan-accelerate-a-list", "--accelerate-config", "@CASE@/acc.yaml",
         expect=("--accelerate-config:", "is not an Accelerate config"), files={"acc.yaml": "- 1\n"}),
    plan("plan-accelerate-processes-negative", "--accelerate-config", "@CASE@/acc.yaml",
         expect=("acc.yaml:3: num_processes: expected at least 1",),
         files={"acc.yaml": ACCELERATE.replace("num_processes: 2", "num_processes: -3")}),
    plan("plan-accelerate-processes-text", "--accelerate-config", "@CASE@/acc.yaml",
         expect=("num_processes: expected int",), files={"acc.yaml": ACCELERATE.replace("2", "abc")}),
    plan("plan-accelerate-fsdp-config-int", "--accelerate-config", "@CASE@/acc.yaml",
         expect=("fsdp_config: expected dict or null",), files={"acc.yaml": ACCELERATE + "fsdp_config: 3\n"}),
    plan("plan-accelerate-key-typo", "--accelerate-config", "@CASE@/acc.yaml",
         expect=("mixed_precison: unknown key", "did you mean 'mixed_precision'?"),
         files={"acc.yaml": ACCELERATE + "mixed_precison: bf16\n"}),
    plan("plan-accelerate-a-recipe", "--accelerate-config", "@R", expect=("is not an Accelerate config",)),
    plan("plan-data-missing", text=sft("@DATA@/sft.jsonl", "nope.jsonl"), expect=("data.files: no such file",)),
    plan("plan-chat-template-typo", text=SFT + "tokenizer: {chat_template: chatmll}\n",
         expect=("tokenizer.chat_template:", "did you mean 'chatml'?")),
    Case("plan-pipeline-stage-model-garbage", ("plan", "@R"),
         "stage: pipeline\noutput_dir: runs\nstages:\n  sft: {recipe: @WORLD@/stages/sft.yaml, set: "
         "{model.name_or_path: @CASE@/model}}\n", ("model/config.json: not a readable JSON config",),
         files={"model/config.json": "{"}),
]


# ---------------------------------------------------------------------------------------------------------------
# running a case
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-world")
    files = {
        "model/config.json": CONFIG,
        "vocab-model/tokenizer.json": VOCAB_ONLY,
        "data/sft.jsonl": "".join(f'{{"prompt": "p{i} ", "completion": "c{i}"}}\n' for i in range(12)),
        "data/prompts.jsonl": "".join(f'{{"prompt": "p{i} "}}\n' for i in range(12)),
        "stages/sft.yaml": SFT,
        "stages/ppo.yaml": PPO,
        "home/.keep": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(fill(text, root, root / "unused"))
    return root


def fill(text: str, world: Path, case: Path) -> str:
    return (text.replace("@MODEL@", str(world / "model")).replace("@DATA@", str(world / "data"))
            .replace("@WORLD@", str(world)).replace("@HOME@", str(world / "home")).replace("@CASE@", str(case))
            .replace("@R", str(case / "r.yaml")))


def tree(root: Path) -> dict[str, object]:
    """Every entry under `root` (dirs, links and pipes included) and every file's bytes, without following links
    or opening pipes."""
    entries: dict[str, object] = {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            key = str(path.relative_to(root))
            if stat.S_ISLNK(mode):
                entries[key] = f"link -> {os.readlink(path)}"
            elif stat.S_ISREG(mode):
                entries[key] = path.read_bytes()
            else:
                entries[key] = stat.S_IFMT(mode)
    return entries


def make_files(case_dir: Path, files: dict[str, object], world: Path) -> None:
    for name, content in files.items():
        path = case_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is FIFO:
            os.mkfifo(path)
        elif content is None:
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, Resolved):
            from rlhf_pipeline.recipe.load import load_recipe

            overrides = [fill(text, world, case_dir) for text in content.overrides]
            path.write_text(load_recipe(case_dir / "r.yaml", overrides).resolved_yaml())
        elif isinstance(content, str) and content.startswith("->"):
            path.symlink_to(content[2:])
        else:
            path.write_text(fill(str(content), world, case_dir))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_input(case: Case, world: Path, tmp_path: Path):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    if case.recipe is not None:
        (case_dir / "r.yaml").write_text(fill(case.recipe, world, case_dir))
    make_files(case_dir, case.files, world)
    env = {**os.environ, "HOME": str(world / "home"), "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for key, value in case.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    before = (tree(case_dir), tree(world))

    done = subprocess.run([rlhf_script(), *(fill(a, world, case_dir) for a in case.args)], cwd=case_dir, env=env,
                          capture_output=True, text=True, timeout=30)

    output = done.stdout + done.stderr
    assert done.returncode == case.code, output
    assert "Traceback" not in output, output
    expected = [fill(text, world, case_dir) for text in case.expect]
    if case.code == 0:
        assert all(text in done.stdout for text in expected), (expected, done.stdout)
        assert not any(text in done.stdout for text in case.absent), done.stdout
    else:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1, done.stderr  # one line: what is wrong, where
        assert case.torch or lines == errors, done.stderr  # before a run starts, nothing else is said
        assert all(text in errors[0] for text in expected), (expected, errors[0])
    assert (tree(case_dir), tree(world)) == before  # nothing written, nothing left behind


def test_the_corpus_is_large_and_its_cases_distinct():
    assert len(CASES) >= 150
    assert len({case.id for case in CASES}) == len(CASES)
    assert sum(case.torch for case in CASES) <= 6  # the corpus stays quick: a run's start costs a torch import


def test_a_run_dirs_recipe_is_read_within_the_limits(tmp_path):
    """`rlhf push` and the model card read a run dir's recipe.resolved.yaml, which may be anyone's: an alias bomb is
    refused there too, not built and rendered."""
    from rlhf_pipeline.errors import UserError
    from rlhf_pipeline.model_card import read_recipe

    (tmp_path / "recipe.resolved.yaml").write_text(BOMB + "stage: sft\n")
    with pytest.raises(UserError, match="recipe.resolved.yaml: more than 100,000 values"):
        read_recipe(tmp_path)
    assert read_recipe(tmp_path, missing_ok=True) == {}
