"""`python -m workflows.local.tinker`: the Tinker stand-in's command line (`make tinker-server`); what it
implements is in the package's docstring (`workflows/local/tinker/__init__.py`)."""

from __future__ import annotations

import sys

from workflows.local.tinker.server import main

if __name__ == "__main__":
    sys.exit(main())
