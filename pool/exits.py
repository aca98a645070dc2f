"""The exit codes of ``ctlpool`` processes, named (systemd units and scripts act on them)."""

EXIT_OK = 0  # drained cleanly
EXIT_CONFIG = 2  # bad flag, env var or config file (argparse's code)
EXIT_CRASH_LOOP = 3  # a worker slot kept dying; systemd's Restart=on-failure takes over
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: broker unreachable or plugin missing
EXIT_STALLED = 70  # sysexits EX_SOFTWARE: a worker whose bookkeeping no reconcile accounts for; restarted
EXIT_TOPOLOGY = 78  # sysexits EX_CONFIG: broker topology disagrees with the settings
EXIT_INTERRUPTED = 130  # second SIGINT/SIGTERM: stopped without draining (128 + SIGINT)
