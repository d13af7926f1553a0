"""The base of every settings model (`Section`): run configuration (transferdesk.config), the
review page's, the tuning file's and the serving arguments' alike.
"""

from __future__ import annotations

import yaml
from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # Unknown keys are almost always typos; refuse them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
