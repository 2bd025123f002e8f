"""Every event name the agent writes to its operational log, with what it means: one list.

An operator greps the journal for these names, and alerts are built on them, so a name is an
interface: ``tests/test_log_events.py`` reads every logging call in ``agent/`` and fails on a
name that is not listed here (a misspelling such as ``command_denyd``), on a name built at run
time (which nothing could check), and on a name listed here that no code writes any more.

(These are the operational logs, structlog JSON: see :mod:`agent.logs`. The audit log's record
names are another list, docs/PROTOCOL.md §9.)
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

EVENTS: Final[Mapping[str, str]] = MappingProxyType(
    {
        # -- the agent's life ------------------------------------------------------------
        "agent_started": "the agent runs: id, version",
        "agent_stopping": "a stop was asked (signal, control socket): why",
        "agent_stopped": "the agent stopped; results not yet delivered",
        "background_task_ended": "a task that should run as long as the agent ended early",
        "audit_log_failed": "the audit log cannot be written: the agent stops (nothing unaudited)",
        "replay_cache_purged": "expired command ids were dropped from the replay cache",
        "health_listening": "the health and metrics endpoint listens: its URL",
        "health_not_on_loopback": "the health endpoint listens beyond loopback (a pod's address)",
        "policy_loaded": "the customer's policy was read: its sha256, why (start, change, SIGHUP)",
        "policy_unchanged": "the policy was re-read (SIGHUP) and is the one in force",
        "policy_reload_failed": "a changed policy file does not parse; the previous one stays",
        # -- enrollment and certificates -------------------------------------------------
        "enrollment_attempt": "self-enrollment sends its token (a pod's first start)",
        "bootstrap_listener_failed": "the health or control socket could not open while enrolling",
        "pod_event_not_posted": "the Kubernetes Event about enrollment could not be posted",
        "certificate_renewed": "a new client certificate is in place (renewal over the tunnel)",
        "certificate_renewal_failed": "renewal failed; it is tried again",
        "certificate_unrequested": "the control plane sent a certificate nobody asked for",
        # -- the tunnel ------------------------------------------------------------------
        "connected": "the TLS connection to the control plane is up: URL, peer certificate",
        "session_ready": "the control plane welcomed the agent: commands may flow",
        "disconnected": "the connection ended: why",
        "reconnect_scheduled": "the next connection attempt, after a delay",
        "reconnect_now": "the wait before the next attempt was cut short (SIGHUP, files renewed)",
        "tls_files_changed": "the certificate, key or CA file changed while disconnected: retried",
        "connect_failed": "a connection attempt failed (network): the error, the next try",
        "connect_refused": "the control plane answered the upgrade with a 4xx (403: revoked)",
        "connect_redirected": "the control plane answered with a redirect, never followed",
        "connection_settings_unusable": "key, certificate, CA or proxy settings cannot be used",
        "tls_certificate_rejected": "a certificate was refused in the TLS handshake: which side",
        "proxy_refused": "the HTTP proxy refused CONNECT (401/403/407): a person must look",
        "tunnel_attempt_failed": "an unexpected error ended a connection attempt",
        "tunnel_task_failed": "a task of the connection failed unexpectedly",
        "identity_mismatch": "the control plane's welcome names another agent id",
        "clock_skew_detected": "the control plane's clock differs from ours by more than 30 s",
        "frame_rejected": "a frame from the control plane was refused (malformed, too large)",
        "peer_error": "the control plane reported an error frame",
        "ack_for_unsent_frame": "an acknowledgement for a frame that was not sent",
        "outbox_frame_replaced": "a newer report replaced an unsent one in the outbox",
        # -- commands ----------------------------------------------------------------------
        "command_accepted": "a signed command passed verification and policy: queued",
        "command_rejected": "a command was refused: verification, policy, limits",
        "command_approved": "a person approved a pending command over the control socket",
        "command_denied": "a person denied a pending command over the control socket",
        "approval_refused": "an approval or denial came from someone the policy does not allow",
        "command_finished": "a command reached its final state",
        "delivery_rejected": "a delivery was refused before it became a command (busy, replay)",
        "refusal_not_queued": "a refusal could not be queued for the control plane",
        "receipt_not_signed": "a final report went without its receipt (the key was unusable)",
        "driver_crashed": "the driver raised something unexpected while running a command",
        "purge_failed": "old commands could not be purged from the state",
        "keyset_accepted": "a new set of command-signing keys is in force",
        "keyset_rejected": "an offered key set was refused: why",
        "keyset_bootstrap_refused": "the configured first key set was refused",
        "keyset_root_replaced": "the configured root is new: key sets of the old one dropped",
        # -- the control socket ----------------------------------------------------------
        "control_socket_client_error": "a local request on the control socket failed",
        # -- streams -----------------------------------------------------------------------
        "stream_opened": "a stream to a target in the customer's network is open",
        "stream_closed": "a stream ended: bytes each way, who ended it",
        "stream_target_unresolvable": "a stream's target name does not resolve",
        "stream_target_connect_failed": "a stream's target refused or did not answer",
        "stream_connection_failed": "the stream connection back to the control plane failed",
        "stream_redirected": "the stream connection was answered with a redirect, never followed",
        # -- drivers -----------------------------------------------------------------------
        "scaled": "the workload runs this many replicas now",
        "upgrade_started": "a rolling upgrade began",
        "upgraded": "every replica runs the new version",
        "rollback_started": "an upgrade is undone (an unhealthy replica)",
        "upgrade_recovery_failed": "an upgrade interrupted by a restart could not be undone",
        "metrics_collected": "metrics were scraped: how many samples",
        "replica_started": "a replica is up and healthy",
        "replica_stopped": "a replica was stopped",
        "replica_stop_failed": "a replica could not be stopped",
        "replica_unhealthy": "a replica failed its health check",
        "replica_restarting": "a replica that died is started again",
        "replica_restart_failed": "a replica that died could not be started again",
        "replica_adopted": "a replica left running by the previous agent process was taken over",
        "replica_gone": "a replica recorded as running was not there any more",
        "replica_kill": "a replica that did not stop in time is killed",
        "replica_unkillable": "a replica survived SIGKILL (or its process cannot be inspected)",
        "supervision_failed": "the replica supervision loop failed; it goes on",
        "kubernetes_conflict_retry": "the Kubernetes API answered 409: the patch is tried again",
        # -- systemd -----------------------------------------------------------------------
        "sd_notify_failed": "a notification to systemd failed",
        "sd_notify_malformed": "NOTIFY_SOCKET is not usable",
        "sd_notify_unsupported_socket": "NOTIFY_SOCKET names a kind of socket not supported",
        "sd_watchdog_bad_environment": "WATCHDOG_USEC or WATCHDOG_PID is not usable",
        "sd_watchdog_health_check_failed": "the agent is not sound: the watchdog is not fed",
    }
)
"""Event name -> what it means."""

__all__ = ["EVENTS"]
