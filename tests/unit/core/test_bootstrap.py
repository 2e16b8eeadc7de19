"""Process start-up helpers."""

from __future__ import annotations

import gc

from services.core.bootstrap import freeze_startup


def test_what_start_up_made_is_kept_out_of_full_collections_and_the_collector_stays_on() -> None:
    gc.unfreeze()
    try:
        freeze_startup()
        assert gc.get_freeze_count() > 10_000  # this test process's modules, at least
        assert gc.isenabled()
    finally:
        gc.unfreeze()
