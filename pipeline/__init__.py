"""rpt-pipeline framework: config, versioned artifact store, stage execution, CLI."""

import logging

__version__ = "0.1.0"

logger = logging.getLogger("rpt")
logger.addHandler(logging.NullHandler())
