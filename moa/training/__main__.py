"""`python -m moa.training CONFIG.yaml ...`: the entry `torchrun` and `deepspeed` launch (same as `moa train`)."""
import sys

from .cli import main

sys.exit(main())
