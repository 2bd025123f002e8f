"""A stub control plane, so that the agent can be driven on one machine for demos and tests.

It speaks docs/PROTOCOL.md for real: a WebSocket server behind mutual TLS that takes each
agent's identity from its client certificate, signs commands with an Ed25519 key (or relays
tokens signed elsewhere), and keeps agents, command history and results in SQLite. Operators use
an HTTP JSON API bound to loopback, the ``cp-stub`` CLI built on it, and a web console.

    signer    make command tokens (PyJWT, EdDSA)
    store     SQLite: agents, commands, status history
    hub       the agent-facing WebSocket server: sessions, delivery, acknowledgements
    api       the operator HTTP JSON API (aiohttp), and the views it shares with the console
    overview  what the API and the console show (timelines, receipts, clock offset, metrics
              per replica, change events): plain functions, no I/O
    operator_commands   scale / upgrade / collect_metrics / update_agent built one way (cp-stub
                        send, console)
    console/  the web console: pages, forms, event stream, sign-in with a token
    server    puts hub, api, console and store together
    client    an httpx client for the API (used by the CLI and the demo)
    cli       ``cp-stub``

Exception tree (:mod:`control_plane_stub.errors`)::

    StubError
    ├── StubConfigError (ValueError)      bad flags or unusable key/certificate files
    ├── CannotListen (OSError)            a listener's address is in use (or not ours)
    ├── UnknownAgent (LookupError)        no such agent
    ├── UnknownCommand (LookupError)      no such command ref
    ├── UnknownForward (LookupError)      no such forward
    ├── BadRequest (ValueError)           an API request that cannot be honoured
    │   └── IdempotencyKeyReused          an Idempotency-Key sent with another request (422)
    ├── IdempotencyKeyTaken               a command is stored under that key (it is replayed)
    └── ApiError                          the API answered with an error (client side)
"""
