"""Progress bars for the long phases (evaluation, mode=eval, the weights fingerprint, judging): tqdm with a
rate and ETA on stderr, on rank 0 only, and quiet where stderr is not a terminal (CI logs, pipes, files), as
tqdm's own `disable=None` is. `TQDM_DISABLE=1` turns every bar off and `TQDM_DISABLE=0` on (e.g. to keep them
in a batch job's log)."""

from __future__ import annotations

import os

from tqdm import tqdm


def progress(iterable=None, *, desc: str, total=None, unit: str = "it", rank: int = 0, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`), shown only where it can be watched."""
    forced = os.environ.get("TQDM_DISABLE")
    if rank != 0:
        disable = True
    elif forced is None or forced.strip() == "":
        disable = None  # tqdm: off when the stream is not a TTY
    else:
        disable = forced.strip().lower() not in ("0", "false", "no")
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, **kwargs)
