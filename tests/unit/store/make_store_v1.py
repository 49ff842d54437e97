"""Write ``data/store_v1.sqlite``: a Server's recovery store as schema version 1 wrote it.

Run from the repository root (``python -m tests.unit.store.make_store_v1``) only to regenerate the
committed fixture; tests/unit/store/test_sqlite_files.py opens a copy of it with the current code. The
rows are written with version 1's SQL (the ``fl_ids`` of the running sum as a JSON list, no CRC-32
columns), exactly as that version's store did.
"""

from __future__ import annotations

import json
from pathlib import Path

from flcluster.store.schema import migrate
from flcluster.store.sqlite import _connect
from tests.unit.store.backends import weights

FIXTURE = Path(__file__).resolve().parent / "data" / "store_v1.sqlite"

IDENTITY = ("server", "node-v1", "Lenet", 2)
SERVER_STATE = (1, 7, "running", '{"iteration": 7}')
MODELS = {5: weights(5), 6: weights(6)}
PARTIAL = (7, weights(70), 3, ["dev-3", "dev-1", "dev-2"])


def write(path: Path = FIXTURE) -> None:
    """Write the version 1 store at ``path`` (replacing it)."""
    path.unlink(missing_ok=True)
    db = _connect(str(path), "FULL")
    try:
        migrate(db, target=1)
        with db.atomic():
            db.execute("INSERT INTO identity VALUES (1, ?, ?, ?, ?)", list(IDENTITY))
            db.execute("INSERT INTO server_state VALUES (1, ?, ?, ?, ?)", list(SERVER_STATE))
            for iteration, blob in MODELS.items():
                db.execute("INSERT INTO models VALUES (?, ?)", [iteration, blob])
            iteration, data, count, fl_ids = PARTIAL
            db.execute(
                "INSERT INTO partial_sum VALUES (1, ?, ?, ?, ?)", [iteration, data, count, json.dumps(fl_ids)]
            )
    finally:
        db.close()


if __name__ == "__main__":
    write()
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")
