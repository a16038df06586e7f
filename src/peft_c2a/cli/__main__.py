"""`python -m peft_c2a.cli <command> ...`: the `peft-c2a` command without its console script."""

import sys

from . import main

sys.exit(main())
