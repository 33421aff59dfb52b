"""How the CLI shows results: JSON documents for now (human output comes next)."""

from __future__ import annotations

import json
from typing import Any


def show_json(document: Any) -> None:
    print(json.dumps(document, indent=2))
