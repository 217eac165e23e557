"""Fine-tune with MeDyate under a memory budget: `python scripts/train.py --help`.

A thin wrapper of `medyate_peft.train` (the same as `medyate train`). Two processes (DDP), on CPU too:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no scripts/train.py --model mcu:mcunet-5fps --dataset DATA --output-dir OUT
"""

import sys

from medyate_peft.train import main

if __name__ == "__main__":
    sys.exit(main())
