"""Character prompt distillation: the code every pipeline image runs (`python -m jobs <phase>`)."""

import os

__version__ = "0.1.0"
# recorded in every manifest; images set DISTILL_CODE_VERSION to their git commit
CODE_VERSION = os.environ.get("DISTILL_CODE_VERSION", __version__)
