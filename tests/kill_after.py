"""`python tests/kill_after.py STEP warp-args…`: run the `warp` CLI and SIGKILL the process right after
the pipeline records step STEP as done (a kill at a step boundary). A test-side fault injection: the
package itself has no kill switch."""

import os
import signal
import sys

from mergekit_warp.pipeline import manifest

step = sys.argv[1]
finish = manifest.Manifest.finish


def finish_then_die(self, name, *args, **kwargs):
    finish(self, name, *args, **kwargs)
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)


manifest.Manifest.finish = finish_then_die
sys.argv = ["warp", *sys.argv[2:]]
from mergekit_warp.cli import main  # noqa: E402

main()
