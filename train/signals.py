"""Ctrl-C and SIGTERM while training: finish the step, write a checkpoint, stop (`StopSignals`)."""

import os
import signal
import threading


class StopSignals:
    """SIGINT and SIGTERM while training: the first asks the loop to stop after the current step, with a checkpoint;
    a second one stops at once (KeyboardInterrupt). Installed by `loop.Trainer.train`, restored by `loop.Trainer.close`."""

    def __init__(self):
        self.received = None  # the first signal's number
        self._previous = {}

    def install(self):
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        # os.write: a signal handler must not re-enter the buffered sys.stderr the loop may be writing to
        if self.received is None:
            self.received = signum
            os.write(
                2, f"\n{name}: finishing this step, then writing a checkpoint; {name} again stops at once\n".encode()
            )
        elif signum == signal.SIGTERM and self.received == signal.SIGINT:
            # a launcher (torchrun) relays the Ctrl-C its workers got themselves as SIGTERM: not a second request
            os.write(2, b"SIGTERM: already stopping after this step\n")
        else:
            self.restore()
            raise KeyboardInterrupt(f"a second {name}")

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        self._previous = {}
