"""`python -m agent_dpo.cli`: the same entry point as the `agent-dpo` console script."""

import sys

from agent_dpo.cli import main

sys.exit(main())
