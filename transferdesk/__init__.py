"""TransferDesk: few-shot intent classifiers for contact centers by transfer learning."""

from transferdesk.config import RunConfig, load_config
from transferdesk.errors import TransferDeskError

__version__ = "0.1.0"
__all__ = ["RunConfig", "TransferDeskError", "__version__", "load_config"]
