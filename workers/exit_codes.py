"""How a worker process ends, so that restart policies (systemd, Docker, Kubernetes) can tell a
clean stop from a failure. ``tubesum worker fetch`` and ``tubesum worker summarise`` exit with:

* 0 (EXIT_OK): stopped on request, everything it held finished or handed back;
* 1 (EXIT_FAILURE): an error stopped it (Celery's "Unrecoverable error", a bad setting, a model
  that does not load);
* 75 (EXIT_CHUNK_ABANDONED, EX_TEMPFAIL): stopped on request with its running chunk unfinished (the
  hand-back grace ran out, or a second SIGTERM): the chunk's videos are back on the queue;
* 143 or 137: killed by a third signal or SIGKILL.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from celery import Celery
from click.exceptions import Exit

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CHUNK_ABANDONED = 75


def run_celery_worker(app: Celery, argv: list[str]) -> int:
    """Run ``celery worker`` with ``argv`` in this process; its exit code. (Celery's
    ``app.worker_main``/``app.start`` drop it: click, run with ``standalone_mode=False``, returns
    the code instead of raising, and a worker stopped by an error then exited 0.)"""
    from celery.bin.celery import celery as celery_cli  # what app.start runs

    celery_cli.params[0].default = app  # the -A app, as app.start sets it
    try:
        code = celery_cli.main(args=argv, standalone_mode=False)
    except Exit as exc:
        code = exc.exit_code
    finally:
        celery_cli.params[0].default = None
    return code if isinstance(code, int) else EXIT_OK


def exit_now(code: int) -> NoReturn:
    """End the process at once with ``code``, after flushing the logs. For a worker whose GPU
    thread is still inside a generation it abandoned: a normal interpreter exit would tear down
    torch's native threads under it ("terminate called without an active exception", SIGABRT)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more to say there
            pass
    os._exit(code)
