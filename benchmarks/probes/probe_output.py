"""Where a probe writes what it measured (each probe runs as a script, so this folder is on its path)."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(folder: str | Path, name: str, document) -> Path:
    """`document` as indented JSON in folder/name (the folder made if missing); the file's path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))
    return path
