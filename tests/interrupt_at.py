"""Run `rlhf ARGS...` and send this process SIGNAL at a known point: a kill -9 (or a Ctrl-C) that tests can place.

    python tests/interrupt_at.py kill-after-checkpoint N ARGS...   SIGKILL once checkpoint N is complete on disk
    python tests/interrupt_at.py ctrl-c-at N ARGS...               SIGINT during Trainer step N / PPO update N
    python tests/interrupt_at.py kill-before-swap 0 ARGS...        SIGKILL once a replacement finished (its
                                                                   metrics.json written), before it is swapped in

Nothing in rlhf_pipeline knows about this file: it wraps the real code from the outside.
"""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    mode, at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    from rlhf_pipeline import runs
    from rlhf_pipeline.ppo import trainer as ppo
    from rlhf_pipeline.stages import common

    if mode == "kill-after-checkpoint":
        write = runs.atomic_write_text

        def write_then_kill(path, text):  # a Trainer checkpoint is complete once its marker is written
            write(path, text)
            if path.name == runs.CHECKPOINT_COMPLETE and path.parent.name == f"checkpoint-{at}":
                os.kill(os.getpid(), signal.SIGKILL)

        runs.atomic_write_text = write_then_kill
        save = ppo.PPOTrainer.save_checkpoint

        def save_then_kill(self):  # a PPO checkpoint is complete once renamed into place
            path = save(self)
            if self.state.update == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        ppo.PPOTrainer.save_checkpoint = save_then_kill
    elif mode == "ctrl-c-at":
        from transformers import TrainerCallback

        callbacks = common.trainer_callbacks

        class CtrlC(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == at:
                    os.kill(os.getpid(), signal.SIGINT)

        common.trainer_callbacks = lambda: [CtrlC(), *callbacks()]
        optimise = ppo.PPOTrainer._optimise

        def optimise_with_ctrl_c(self, *a, **k):
            if self.state.update + 1 == at:
                os.kill(os.getpid(), signal.SIGINT)
            return optimise(self, *a, **k)

        ppo.PPOTrainer._optimise = optimise_with_ctrl_c
    elif mode == "kill-before-swap":
        def kill(staged, final):
            os.kill(os.getpid(), signal.SIGKILL)

        runs.promote = kill
    else:
        raise SystemExit(f"unknown mode {mode}")

    from rlhf_pipeline.cli import main as rlhf

    sys.argv = ["rlhf", *args]
    rlhf()


if __name__ == "__main__":
    main()
