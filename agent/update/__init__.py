"""The agent updates itself: the ``update_agent`` command (README.md, "Updating the agent").

Modules:
    bundle     the release bundle's format and its verification (sans-I/O)
    download   httpx, no redirects, a size cap, hashed as it streams
    install    releases side by side (``<root>/releases/<version>``), the ``current`` link,
               venv + ``pip install --no-index`` from the bundle's wheels
    selftest   ``byoc-agent self-test``: the new release, on the live configuration and state
    guard      the journal, the atomic switch, and the trial guard systemd runs before every
               start (standard library only: it must work when a release cannot)
    updater    the command, step by step, and the trial in the release that starts next
    bridge     the updater as the daemon builds it, and how the agent carries it out
    build      ``make bundle``: build and sign a bundle from this tree

Errors (every failure is a DriverError, so it becomes the command's ``failed`` reason)::

    DriverError (agent.core.errors)
    └── UpdateError          an update step failed (code, detail, result)
        └── BundleRejected   the bundle is refused before anything in it is unpacked
    Handover (agent.core.errors) not a failure: the agent restarts into another release, which
                             reports the command's final state
"""
