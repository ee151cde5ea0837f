"""Who may publish and subscribe what on NATS: one user per service, least privilege.

Anyone who can publish on the event log can forge events (a ``TaskSubmitted`` whose
``status_url`` makes the poller send our fal key to their host, an ``ImagesStored`` for
another user's task). So the NATS server authenticates every connection, and each service's
user may publish only the events that service emits (plus its own dead letters) and call only
the JetStream API it uses on our stream:

============  =============================================  ====================================
user          publishes (events)                             JetStream API
============  =============================================  ====================================
gateway       ``task.*.requested``, ``history.*.*.hidden``,  stream info/create, message get,
              ``credits.*``, ``config.changed``              the rate-limit KV bucket,
                                                             ordered consumers (live task feed)
submitter     ``task.*.{submitted,failed}``                  + its durable consumer
poller        ``task.*.{status,completed,failed}``           + its durable consumer
uploader      ``task.*.{stored,storage_failed}``             + its durable consumer
projector     its dead letters only                          ordered consumer over ``<prefix>.>``
ledger        ``credits.*``, ``task.*.requested`` (sweeper)  + its durable consumer
operator      everything (the operators' CLI tools)          everything
============  =============================================  ====================================

Every user may subscribe to ``_INBOX.>`` (request replies, ordered consumers' deliveries);
workers also subscribe to ``<prefix>.task.*.*`` (they wait on a task's next event live).

``fluxpipe up`` generates the passwords once into ``<data dir>/nats-users.json`` (mode 0600),
writes the server's ``authorization`` block, and gives each service only its own user and
password through its environment (``NATS_USER`` / ``NATS_PASSWORD``). compose.yaml uses
``deploy/nats-server.conf``, the same table with passwords taken from the environment.

A new event family (credits, configuration…) must be added to the publisher's row in
``PUBLISHES`` below, or its publishes are refused by the server.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

USERS_FILE = "nats-users.json"
SERVICES = ("gateway", "submitter", "poller", "uploader", "projector", "ledger")
OPERATOR = "operator"

PUBLISHES: dict[str, tuple[str, ...]] = {
    "gateway": ("task.*.requested", "history.*.*.hidden", "credits.*", "config.changed"),
    "submitter": ("task.*.submitted", "task.*.failed", "dlq.submitter"),
    "poller": ("task.*.status", "task.*.completed", "task.*.failed", "dlq.poller"),
    "uploader": ("task.*.stored", "task.*.storage_failed", "dlq.uploader"),
    "projector": ("dlq.projector",),
    # charges and refunds; the sweeper re-publishes a held job's request (same msg id)
    "ledger": ("credits.*", "task.*.requested", "dlq.ledger"),
}
DURABLES: dict[str, str] = {
    "submitter": "submitter",
    "poller": "poller",
    "uploader": "uploader",
    "ledger": "ledger",
}


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def permissions(user: str, stream: str, prefix: str) -> Permissions:
    """The subjects ``user`` may publish to and subscribe on, for this stream and prefix."""
    if user == OPERATOR:
        return Permissions(publish=(">",), subscribe=(">",))
    if user not in PUBLISHES:
        raise ValueError(f"no NATS permissions are defined for {user!r}")
    api = "$JS.API"
    publish = [f"{prefix}.{subject}" for subject in PUBLISHES[user]]
    publish += [
        f"{api}.INFO",
        f"{api}.STREAM.INFO.{stream}",
        f"{api}.STREAM.CREATE.{stream}",
        f"{api}.STREAM.MSG.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}",
        f"{api}.DIRECT.GET.{stream}.>",
        # Ordered consumers (the projector, live task feeds): ephemeral, named by the server.
        f"{api}.CONSUMER.CREATE.{stream}",
        "$JS.FC.>",
    ]
    if user == "gateway":
        # the per-user rate limits: a key-value bucket of its own (services/common/ratelimit.py)
        bucket = f"{stream}_ratelimits"
        publish += [
            f"$KV.{bucket}.>",
            f"{api}.STREAM.INFO.KV_{bucket}",
            f"{api}.STREAM.CREATE.KV_{bucket}",
            f"{api}.STREAM.MSG.GET.KV_{bucket}",
            f"{api}.DIRECT.GET.KV_{bucket}",
            f"{api}.DIRECT.GET.KV_{bucket}.>",
        ]
    subscribe = ["_INBOX.>"]
    if durable := DURABLES.get(user):
        publish += [
            f"{api}.CONSUMER.CREATE.{stream}.{durable}",
            f"{api}.CONSUMER.CREATE.{stream}.{durable}.>",
            f"{api}.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"{api}.CONSUMER.INFO.{stream}.{durable}",
            f"{api}.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ]
        subscribe.append(f"{prefix}.task.*.*")
    return Permissions(publish=tuple(publish), subscribe=tuple(subscribe))


def load_or_create_users(data_dir: Path) -> dict[str, str]:
    """Each service's (and the operator's) password, generated once and kept in the data dir."""
    path = data_dir / USERS_FILE
    users: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    missing = [u for u in (*SERVICES, OPERATOR) if u not in users]
    if missing:
        users.update({u: secrets.token_urlsafe(24) for u in missing})
        data_dir.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(users, indent=2))
    return users


def authorization_block(users: dict[str, str], stream: str, prefix: str) -> str:
    """The ``authorization { users = [...] }`` block of nats-server's configuration.

    Passwords are literal strings, or ``$NAME`` references to environment variables (NATS
    resolves those when it reads the file; compose.yaml uses that)."""
    entries = []
    for user, password in users.items():
        perms = permissions(user, stream, prefix)
        value = password if password.startswith("$") else json.dumps(password)
        rights = f"publish: {json.dumps(list(perms.publish))}, subscribe: {json.dumps(list(perms.subscribe))}"
        entries.append(f"    {{user: {json.dumps(user)}, password: {value}, permissions: {{{rights}}}}}")
    return "authorization {\n  users = [\n" + ",\n".join(entries) + "\n  ]\n}\n"


def service_env(users: dict[str, str], service: str) -> dict[str, str]:
    """The environment that makes ``service`` connect as its own NATS user."""
    return {"NATS_USER": service, "NATS_PASSWORD": users[service]}


def compose_config(stream: str = "FLUX", prefix: str = "flux") -> str:
    """``deploy/nats-server.conf``: JetStream plus the users, passwords from the environment."""
    users = {u: f"$NATS_{u.upper()}_PASSWORD" for u in (*SERVICES, OPERATOR)}
    return (
        "# Generated by services.common.nats_auth.compose_config(); edit the table there, not here.\n"
        'jetstream {\n  store_dir: "/data"\n}\n' + authorization_block(users, stream, prefix)
    )
