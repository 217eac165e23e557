"""Run `medyate ARGS` with a hash seed of its own per DDP rank (launched by `accelerate launch`).

Python fixes PYTHONHASHSEED at interpreter start, so the rank re-executes itself with it set: set
and dict-of-set orders then differ between ranks, as they may on any two machines.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    seed = str(11 + 7 * int(os.environ["LOCAL_RANK"]))
    command = [sys.executable, "-m", "medyate_peft.cli", *sys.argv[1:]]
    os.execve(sys.executable, command, {**os.environ, "PYTHONHASHSEED": seed})
