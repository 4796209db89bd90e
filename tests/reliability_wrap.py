"""`python tests/reliability_wrap.py MODE warp-args…`: run the `warp` CLI (its real entry point, `main()`)
with one test-side fault injected. A test helper of tests/test_reliability.py; the package itself has
no kill switch.

MODE:
  kill-after-rename=KIND   SIGKILL this process right after a `Path.rename` whose target is a hidden
                           `.NAME.KIND-PID-NS` sibling (KIND: new or old), i.e. inside `io.atomic.staged`:
                           `new` = right after tmp → .OUT.new-ID (OUT still holds the old content),
                           `old` = right after OUT → .OUT.old-ID (the commit point: OUT is missing).
  pause-in-merge=MARKER    at the merge's first output tensor (inside the staged temp folder), write
                           MARKER and sleep up to 60 s, so the test can send a signal at a known point.
"""

import os
import pathlib
import re
import signal
import sys
import time

mode, _, arg = sys.argv[1].partition("=")

if mode == "kill-after-rename":
    pattern = re.compile(rf"^\..+\.{re.escape(arg)}-\d+-\d+$")
    rename = pathlib.Path.rename

    def rename_then_die(self, target):
        result = rename(self, target)
        if pattern.match(pathlib.Path(target).name):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    pathlib.Path.rename = rename_then_die
elif mode == "pause-in-merge":
    from mergekit_warp.merge import engine

    stream = engine._stream_tensor
    paused = []

    def pause_then_stream(*args, **kwargs):
        if not paused:
            paused.append(True)
            pathlib.Path(arg).write_text(str(os.getpid()))
            deadline = time.time() + 60
            while time.time() < deadline:
                time.sleep(0.05)
        return stream(*args, **kwargs)

    engine._stream_tensor = pause_then_stream
else:
    raise SystemExit(f"reliability_wrap.py: unknown mode {sys.argv[1]!r}")

sys.argv = ["warp", *sys.argv[2:]]
from mergekit_warp.cli import main  # noqa: E402

main()
