"""What runs in every worker process of a Ray that reb starts, before its first task (Ray's
`worker_process_setup_hook`). Standard library only: it is imported while a worker starts.
"""

from __future__ import annotations

import os
import sys

SETUP_HOOK = f"{__name__}.quiet_sigterm_exit"  # how ray.init's runtime_env names the hook


def quiet_sigterm_exit() -> None:
    """A SIGTERM that lands where Python cannot raise ends the worker at once, without a traceback.

    Ray stops a worker (an actor Tune no longer needs, an idle worker it trims) with SIGTERM, and its
    handler raises SystemExit. Where that lands inside a finaliser, a weakref callback or an import
    lock's callback, Python cannot raise it: it prints "Exception ignored in ... SystemExit: 1" on the
    worker's stderr, which Ray forwards to the console of `reb tune` (seen with two tunes sharing
    2 cores), and the worker runs on as if never told to stop. Such a SystemExit now ends the process
    with its exit code, as the SIGTERM asked; every other unraisable exception is reported as before.
    """
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, SystemExit):
            code = unraisable.exc_value.code
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # a closed or broken stream: nothing more to keep
                    pass
            os._exit(code if isinstance(code, int) else 1)
        previous(unraisable)

    sys.unraisablehook = hook
