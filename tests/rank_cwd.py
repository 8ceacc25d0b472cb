"""The rlhf CLI in one process of a torchrun launch, run from a working directory of its own ($RLHF_RANK_CWD_<RANK>):
with a relative output dir, each process then sees a run dir of its own, as processes on machines that share no
disk do. For tests/test_distributed.py.

    RLHF_RANK_CWD_0=a RLHF_RANK_CWD_1=b python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/rank_cwd.py sft RECIPE
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.chdir(os.environ[f"RLHF_RANK_CWD_{os.environ['RANK']}"])
    from rlhf_pipeline.cli import main as rlhf

    sys.argv = ["rlhf", *sys.argv[1:]]
    rlhf()


if __name__ == "__main__":
    main()
