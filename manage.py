#!/usr/bin/env python
import atexit
import gc
import os
import sys

if __name__ == "__main__":
    # At exit the interpreter's last collections walk every object Django and the app made
    # (about 80,000): 0.1-0.2 s of every command (docs/performance-history.md, "Round 17"). Frozen,
    # they are skipped. Registered first, so it runs last (exit handlers run last-in,
    # first-out): every other handler, the streams' flush and the connections' close still
    # run; only the walk is skipped, and the process's memory goes back to the system as
    # it would after it.
    atexit.register(gc.freeze)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kana.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
