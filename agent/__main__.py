"""``python -m agent``: the ``storefleet-agent`` command."""

import sys

from agent.cli import main

sys.exit(main())
