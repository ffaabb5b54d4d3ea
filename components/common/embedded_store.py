"""The embedded MLflow store of a local storage root (``<root>/mlflow.db`` and ``<root>/mlartifacts``)
moves with its root.

MLflow records artifact locations as absolute URIs (``file:///old/root/mlartifacts/...``). The
manifests of a root are relative to it, so a copied or moved root is still a cache; without this
its MLflow experiment would go on writing artifacts under the old path (re-creating it) and its
old runs' artifacts would point there. On opening, if the root was elsewhere when its store was
last used (``.mlflow_root`` remembers), the prefixes are rewritten in the SQLite file to the new
path. Only the embedded store is touched: a tracking server owns its own locations.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

MARKER = ".mlflow_root"
# (table, column) holding artifact URIs in MLflow 3's SQLite schema; absent ones are skipped
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("model_versions", "storage_location"), ("model_versions", "source"),
                    ("logged_models", "artifact_location"))

log = logging.getLogger(__name__)


def relocate(root: Path) -> None:
    """Rewrite the embedded store's artifact URIs if ``root`` has moved since it was last used."""
    root = root.absolute()
    database, marker = root / "mlflow.db", root / MARKER
    previous = marker.read_text().strip() if marker.is_file() else None
    if database.is_file() and previous and previous != str(root):
        changed = _rewrite_prefix(database, f"file://{previous}/", f"file://{root}/")
        log.info("MLflow store of %s: moved from %s; %d artifact locations rewritten", root, previous, changed)
    if previous != str(root):
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(root))


def _rewrite_prefix(database: Path, old: str, new: str) -> int:
    changed = 0
    with sqlite3.connect(database) as connection:
        for table, column in LOCATION_COLUMNS:
            columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
            if column not in columns:
                continue
            cursor = connection.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                (new, len(old) + 1, len(old), old))
            changed += cursor.rowcount
    return changed
