"""Delivery defaults and the one backoff formula: how often and how long tubesum retries.

Named here so that the tasks, the batcher and the Celery app agree, and the settings' checks (a
visibility timeout longer than any retry pause, say) can read them. Seconds unless named otherwise.
"""

from __future__ import annotations

import random

# --- the summarise task -----------------------------------------------------------------------------
# A chunk whose commit failed (database unreachable) is redelivered this many times.
STORE_MAX_RETRIES = 5
# Pause before such a redelivery.
STORE_RETRY_DELAY_S = 10.0
# A claim or a chunk's commit waits out a database outage instead: workers/db_outage.py.

# --- the fetch task ---------------------------------------------------------------------------------
# Its claims and writes wait out a database outage too (workers/db_outage.py); transient YouTube
# errors are retried per TUBESUM_FETCH_MAX_RETRIES / TUBESUM_FETCH_BACKOFF_*_S.

# --- the broker -------------------------------------------------------------------------------------
# Delay before a task whose worker process died runs again (every other retry passes its own).
WORKER_LOST_RETRY_DELAY_S = 2
# Publishing retries: about 90 s in all (0, 1, 2, 3, 4, then every 5 s).
PUBLISH_RETRY_POLICY = {"max_retries": 20, "interval_start": 0, "interval_step": 1, "interval_max": 5}
# Sweeps for unacknowledged messages past their visibility timeout: at most this far apart.
MAX_RESTORE_INTERVAL_S = 10


def backoff_delay(retries: int, *, base_s: float, max_s: float, jitter: bool = True) -> float:
    """Pause before retry number ``retries + 1``: doubling from base_s, capped at max_s. With
    jitter, "equal jitter" (half fixed, half random) so a blocked fleet does not retry in lock-step."""
    ceiling = min(max_s, base_s * 2**retries)
    return ceiling / 2 + random.uniform(0, ceiling / 2) if jitter else ceiling
