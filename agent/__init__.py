"""BYOC-I agent: an outbound-only, mutually authenticated tunnel to a vendor control plane.

The agent receives signed commands, checks them against the customer's own policy, executes
them locally through a driver, and keeps a hash-chained audit log.

Layout
------
Sans-I/O core (plain functions and classes: bytes, time and state in, decisions out):
    frames        the wire codec of docs/PROTOCOL.md, with its size limits
    session       the per-connection state machine: handshake, heartbeats, timeouts
    verifier      untrusted JWS compact tokens in, a trusted ``Command`` or a precise rejection out
    commands      command types and their typed parameters
    policy        the customer's policy file and its decisions
    audit_chain   hash-chained audit records and their verification
    backoff       capped exponential backoff with full jitter

I/O layer (asyncio, sockets, files, processes):
    audit_log, state, tls, tunnel, executor, control_socket, sdnotify, daemon, cli, drivers.*

Self-update (the ``update_agent`` command): agent.update.

The exception tree lives in :mod:`agent.core.errors`.
"""

__version__ = "0.1.0"
