"""``tubesum flower``: Flower, never without a password.

Started by hand without ``--basic-auth``, Flower serves its pages to anyone who reaches its port
(only its REST API refuses), and it accepts ``admin:`` (an empty password). This wrapper refuses
both before Flower starts, and hands the credentials to Flower through its environment
(``FLOWER_BASIC_AUTH``, which Flower reads itself) rather than its command line, where ``ps`` and
``docker inspect`` would show them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from tubesum.errors import BadInput

# Flower reads this variable itself: ``user:password``, several separated by commas.
FLOWER_AUTH_ENV = "FLOWER_BASIC_AUTH"
# Columns of Flower's Tasks page: the job and video (args), what happened (result, or the
# exception of a failed video) besides Flower's defaults; the uuid stays on each task's own page.
TASKS_COLUMNS = "name,args,state,result,exception,received,runtime,worker"


def check_basic_auth(value: str | None) -> list[str]:
    """The ``user:password`` pairs of ``value``; BadInput when there is none, or when a user name or
    a password is empty."""
    if not value or not value.strip():
        raise BadInput(
            f"{FLOWER_AUTH_ENV} is not set: without it Flower shows every task to anyone who "
            f"reaches its port; set it to user:password, e.g. "
            f"export {FLOWER_AUTH_ENV}=admin:$(openssl rand -hex 12)"
        )
    pairs = value.split(",")
    for number, pair in enumerate(pairs, start=1):
        user, colon, password = pair.partition(":")
        where = f"{FLOWER_AUTH_ENV} entry {number}" if len(pairs) > 1 else FLOWER_AUTH_ENV
        if not colon:  # "adminnopw": a password alone is as likely as a user name alone; name neither
            raise BadInput(f"{where} must be user:password, with a colon between them (got no colon)")
        if not user.strip():
            raise BadInput(f"{where} must be user:password (got no user name)")
        if not password.strip():
            raise BadInput(
                f"{where} has an empty password for user {user.strip()!r}: Flower would accept "
                f"anyone who types that name"
            )
    return pairs


def flower_argv(*, port: int, address: str) -> list[str]:
    """Flower on this project's Celery app; no credentials here (they travel in the environment)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "tubesum.celery_app",
        "flower",
        f"--port={port}",
        f"--address={address}",
        f"--tasks-columns={TASKS_COLUMNS}",
    ]


def exec_flower(*, port: int, address: str, env: Mapping[str, str] | None = None) -> None:
    """Check the credentials, then replace this process with Flower (signals reach Flower itself)."""
    env = dict(os.environ if env is None else env)
    check_basic_auth(env.get(FLOWER_AUTH_ENV))
    argv = flower_argv(port=port, address=address)
    os.execve(argv[0], argv, env)
