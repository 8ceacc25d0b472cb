"""Accelerate config files: the shipped ones load with Accelerate's real loader and launch-argument handling; our
torch-free check (rlhf_pipeline/recipe/accelerate_config.py) agrees with Accelerate, and catches what it ignores."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import REPO

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.recipe import accelerate_config

CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))

# file -> (distributed_type, fsdp_version, zero_stage, num_processes)
EXPECTED = {
    "single_gpu.yaml": ("NO", None, None, 1),
    "ddp.yaml": ("MULTI_GPU", None, None, 8),
    "fsdp.yaml": ("FSDP", 2, None, 8),
    "zero2.yaml": ("DEEPSPEED", None, 2, 8),
    "zero3.yaml": ("DEEPSPEED", None, 3, 8),
    "multi_node.yaml": ("MULTI_GPU", None, None, 16),
}


def test_snapshot_matches_installed_accelerate():
    committed = json.loads(accelerate_config.SNAPSHOT.read_text())
    regenerate = "regenerate it with `python -m rlhf_pipeline.recipe.accelerate_config` and commit the result"
    assert committed == accelerate_config.take_snapshot(), regenerate


def test_every_shipped_config_is_expected():
    assert {p.name for p in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_with_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    distributed_type, fsdp_version, zero_stage, processes = EXPECTED[path.name]
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == distributed_type
    assert config.fsdp_config.get("fsdp_version") == fsdp_version
    assert config.deepspeed_config.get("zero_stage") == zero_stage
    assert config.num_processes == processes

    # what `accelerate launch --config_file` does with it before starting processes (a private function of
    # Accelerate's: runs on a CPU, starts nothing)
    parser = launch_command_parser()
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "-m", "rlhf_pipeline",
                                                            "sft", "recipes/tiny/sft.yaml"]))
    assert args.use_fsdp == (distributed_type == "FSDP")
    assert args.use_deepspeed == (distributed_type == "DEEPSPEED")
    assert args.num_processes == processes
    options = vars(parser.parse_args(["x.py"]))
    for key in {**config.fsdp_config, **config.deepspeed_config}:  # every section key is a launch option
        assert (key if key in config.deepspeed_config or key.startswith("fsdp") else f"fsdp_{key}") in options

    described = accelerate_config.check_file(path.relative_to(REPO))
    assert described.startswith(f"Accelerate config: {'DeepSpeed' if zero_stage else distributed_type}")
    assert f"{processes} process" in described
    if fsdp_version:
        assert f"FSDP version {fsdp_version}" in described
    if zero_stage:
        assert f"ZeRO-{zero_stage}" in described


def test_recipes_are_not_accelerate_configs():
    for path in (REPO / "recipes").rglob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        assert accelerate_config.is_accelerate_config(data) == (path.parent.name == "accelerate"), path
    # a recipe names its stage: one with a stray Accelerate key stays a recipe (and fails as one)
    assert not accelerate_config.is_accelerate_config({"stage": "sft", "distributed_type": "FSDP"})
    assert accelerate_config.is_accelerate_config({"compute_environment": "LOCAL_MACHINE"})


DDP = "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
FSDP = "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n"

# (name, config text, Accelerate's loader rejects it too, [(key, line, words in the message)])
BROKEN = [
    ("misspelt-key", DDP + "num_proceses: 8\n", True,
     [("num_proceses", 5, "unknown key for Accelerate's ClusterConfig; did you mean 'num_processes'?")]),
    ("bad-distributed-type", DDP.replace("MULTI_GPU", "MULTI_GPUS"), True,
     [("distributed_type", 2, "expected one of NO, MULTI_CPU, MULTI_GPU,"), ("distributed_type", 2, "MULTI_GPU'?")]),
    ("misspelt-distributed-type-key", DDP.replace("distributed_type", "distributed_typ"), True,
     [("distributed_typ", 2, "did you mean 'distributed_type'?"), ("distributed_type", None, "required key")]),
    # Accelerate loads these, and launch goes wrong later (or silently ignores the key): stricter on purpose
    ("unquoted-NO", DDP.replace("MULTI_GPU", "NO").replace("2\n", "1\n"), False,
     [("distributed_type", 2, 'YAML reads an unquoted NO as false; write "NO"')]),
    ("unquoted-no", DDP + "mixed_precision: no\n", False,
     [("mixed_precision", 5, 'YAML reads an unquoted no as false; write "no"')]),
    ("gpu-ids-int", DDP + "gpu_ids: 0\n", False, [("gpu_ids", 5, "expected null or str (got 0)")]),
    ("misspelt-fsdp-key", FSDP + "  fsdp_transformer_layer_cls_to_warp: GPT2Block\n", False,
     [("fsdp_config.fsdp_transformer_layer_cls_to_warp", 5,
       "accelerate launch has no such option, and would ignore it; did you mean "
       "'fsdp_transformer_layer_cls_to_wrap'?")]),
    ("fsdp-version-3", FSDP + "  version: 3\n", False, [("fsdp_config.version", 5, "expected 1 or 2 (got 3)")]),
    ("zero-stage-4", DDP.replace("MULTI_GPU", "DEEPSPEED") + "deepspeed_config:\n  zero_stage: 4\n", False,
     [("deepspeed_config.zero_stage", 6, "expected 0, 1, 2 or 3 (got 4)")]),
    ("ignored-section", DDP + "fsdp_config:\n  fsdp_version: 2\n", False,
     [("fsdp_config", 5, "ignored: accelerate launch reads it only when distributed_type is FSDP (here MULTI_GPU)")]),
    ("one-process-NO", DDP.replace("MULTI_GPU", '"NO"'), False,
     [("num_processes", 4, "distributed_type NO runs one process")]),
    ("one-process-MULTI_CPU", DDP.replace("MULTI_GPU", "MULTI_CPU"), False,
     [("num_processes", 4, "runs MULTI_CPU as one process unless mpirun_config.mpirun_hostfile is set")]),
    ("no-processes", DDP.replace("num_processes: 2", "num_processes: 0"), False,
     [("num_processes", 4, "expected at least 1")]),
    ("two-machines", DDP.replace("num_machines: 1", "num_machines: 2").replace("processes: 2", "processes: 3")
     + "machine_rank: 2\n", False,
     [("main_process_ip", None, "required on 2 machines"), ("machine_rank", 5, "expected 0 to 1 for 2 machines"),
      ("num_processes", 4, "do not divide evenly")]),
]


@pytest.mark.parametrize("name, text, accelerate_rejects, expected", BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_config(tmp_path, name, text, accelerate_rejects, expected):
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        accelerate_config.check_file(path)
    found = info.value.problems
    assert all(p.file == str(path) for p in found)
    for key, line, words in expected:
        assert any(p.key == key and p.line == line and words in p.message for p in found), (key, words, found)
    if accelerate_rejects:
        with pytest.raises(ValueError):
            load_config_from_file(str(path))
    else:
        load_config_from_file(str(path))


def test_what_accelerate_accepts_we_accept(tmp_path):
    from accelerate.commands.config.config_args import SageMakerConfig, load_config_from_file

    cases = {
        "legacy.yaml": "distributed_type: MULTI_GPU\nnum_processes: 2\nfp16: true\ndynamo_backend: 'NO'\n",
        "mpirun.yaml": "distributed_type: MULTI_CPU\nnum_processes: 4\nmpirun_config:\n  mpirun_hostfile: hosts\n",
        "short-fsdp.yaml": FSDP + "  version: 2\n  reshard_after_forward: true\n",  # launch adds the fsdp_ prefix
        "sagemaker.yaml": "compute_environment: AMAZON_SAGEMAKER\ndistributed_type: DATA_PARALLEL\n"
                          "ec2_instance_type: ml.p3.16xlarge\niam_role_name: role\nnum_machines: 2\n",
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_text(text)
        load_config_from_file(str(path))
        assert accelerate_config.check_file(path).startswith("Accelerate config: "), name
    short = accelerate_config.check_file(tmp_path / "short-fsdp.yaml")
    assert short == "Accelerate config: FSDP version 2, 2 processes"
    assert isinstance(load_config_from_file(str(tmp_path / "sagemaker.yaml")), SageMakerConfig)
    assert accelerate_config.check_file(tmp_path / "sagemaker.yaml") == \
        "Accelerate config: SageMaker DATA_PARALLEL, 2 machines"
    (tmp_path / "bad-sagemaker.yaml").write_text(cases["sagemaker.yaml"].replace("iam_role_name: role\n", ""))
    with pytest.raises(RecipeError, match="iam_role_name: required key is missing"):
        accelerate_config.check_file(tmp_path / "bad-sagemaker.yaml")
