"""What every tool in `finetune/` runs: logging set up once, user errors as one line and exit status 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from library.errors import UserError

logger = logging.getLogger("finetune")


def run_tool(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call `main(argv)`; a `UserError` ends the tool with its message on one line and exit status 1."""
    from library.training.entry import configure_logging

    configure_logging()
    try:
        main(argv)
    except UserError as err:
        logger.error("%s", err)
        sys.exit(1)
    except KeyboardInterrupt:
        logger.error("interrupted")
        sys.exit(130)
