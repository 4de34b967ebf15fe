"""`python tests/train_pausing_in_save.py <step> <seconds> <train.py overrides...>`: train.py as a user runs it,
but the save of optimizer step <step> sleeps after its files are complete in the temporary directory and before
the rename, so a test can SIGKILL the process mid-save. The pause is patched in from here; the product has no
test hook."""

import sys
import time

from feedbackalign import checkpoints

step, seconds = int(sys.argv[1]), float(sys.argv[2])
fsync_tree = checkpoints._fsync_tree


def pausing_fsync_tree(path):
    fsync_tree(path)
    if path.name.startswith(f".tmp-step-{step:06d}-"):
        time.sleep(seconds)


checkpoints._fsync_tree = pausing_fsync_tree
sys.argv = ["train.py", *sys.argv[3:]]

import train  # noqa: E402  (imported after the patch, as `python train.py` would import it)

train.main()
