"""Reads a folder of TensorBoard event files with TensorBoard's own reader (the event
accumulator of the `tensorboard` package, as the TensorBoard app loads a run) and prints, as
JSON: the file version it saw and every scalar tag with its `[step, value]` points.

    python tensorboard_read.py RUN_DIR
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator

acc = event_accumulator.EventAccumulator(
    sys.argv[1], size_guidance={event_accumulator.SCALARS: 0}
)
acc.Reload()
scalars = {
    tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
}
print(json.dumps({"file_version": acc.file_version, "scalars": scalars}))
