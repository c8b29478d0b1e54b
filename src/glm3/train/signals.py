"""Stop requests during training: SIGINT (Ctrl-C) and SIGTERM end the run cleanly after the current step.

MindSpore complicates the report. While it runs a graph (nearly all of a training step) it installs its own
SIGINT handler, which sends the process a SIGTERM instead, so a Ctrl-C arrives as SIGTERM (the run was
reported as "stopped by signal 15"). A small native helper (csrc/sigterm_sender.cc, built like the kernels)
records whether a SIGTERM came from the process itself: that one is the user's Ctrl-C, passed on by MindSpore
(even when a launcher's SIGTERM follows before Python's handler runs).
Without a compiler the report says SIGTERM.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading

from glm3.native import CSRC, SIGTERM_SENDER, build_library

_HELPER = os.path.join(CSRC, SIGTERM_SENDER)


def signal_name(signum: int) -> str:
    """ "SIGINT (Ctrl-C)", "SIGTERM", ...; for 0 (a requested stop, no signal) "the stop_after setting"."""
    if not signum:
        return "the stop_after setting"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
    return f"{name} (Ctrl-C)" if signum == signal.SIGINT else name


def _sender_helper():
    path = build_library(_HELPER, "a Ctrl-C during training is reported as the SIGTERM MindSpore turns it into")
    if path is None:
        return None
    helper = ctypes.CDLL(path)
    helper.glm3_sigterm_from_self.restype = ctypes.c_int
    return helper


def ignore_further_stops() -> None:
    """For a process that is ending after a stop request: a launcher's SIGTERM that follows the user's Ctrl-C
    (DVC and msrun send one to their children) must not kill it while it reports and exits."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class StopRequests:
    """Within `with`, SIGINT and SIGTERM set `signum` (the first one to arrive; the loop checks it between
    steps) instead of ending the process. Main thread only; elsewhere a no-op."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._helper = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
            self._helper = _sender_helper()
            if self._helper is not None:
                self._helper.glm3_watch_sigterm()  # wraps the SIGTERM handler just set
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGTERM and self._helper is not None and self._helper.glm3_sigterm_from_self():
            signum = signal.SIGINT  # MindSpore's handler passing on a Ctrl-C (see the module docstring)
        if self.signum is None:  # a launcher's SIGTERM after the user's Ctrl-C does not replace it
            self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
