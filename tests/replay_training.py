"""A transformers training run that test_replay.py watches while it writes checkpoints.

Usage: python replay_training.py OUT_DIR
Saves a checkpoint every 4 of 12 steps, one second a step, so that a watcher sees the
folder grow.
"""

import sys
import time

from hf_helpers import TokenData, make_trainer
from transformers import TrainerCallback


class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(1.0)


if __name__ == "__main__":
    trainer = make_trainer(
        sys.argv[1], data=TokenData(64), save_strategy="steps", save_steps=4, max_steps=12
    )
    trainer.add_callback(Slow())
    trainer.train()
