"""`python -m workflows.tinker_server`: the Tinker stand-in's command line (`make tinker-server`). The stand-in
itself, and what it implements, is the package `workflows.tinker_standin`."""

from __future__ import annotations

import sys

from workflows.tinker_standin.process import TinkerServer
from workflows.tinker_standin.server import main

__all__ = ["TinkerServer", "main"]

if __name__ == "__main__":
    sys.exit(main())
