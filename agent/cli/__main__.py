"""``python -m agent.cli``: the same as the ``sct-agent`` command (systemd units and tests start it this way)."""

import sys

from agent.cli import main

sys.exit(main())
