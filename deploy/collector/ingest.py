"""The MQTT side of the archive: a persistent MQTT 5 session, results from a shared subscription.

* ``clean_start=False`` with a session expiry: while this instance is away the broker keeps its
  session and queues what was routed to it; a restart under the same client id gets it all.
* Results come from ``$share/<group>/<prefix>/+/result``: the instances of a group split them.
* Retained live state (availability, status, ota/state) comes from plain subscriptions, because
  the broker never sends retained messages to a shared subscription; every instance stores it
  (the writes are idempotent).
* paho's network thread only queues what arrives; one writer thread turns the queue into rows,
  several results per transaction, and acknowledges (manual PUBACK) only after the commit.

No single message can stop ingest.  Every error while handling a message is one of two kinds
(docs/collector.md, "Failure classes"):

* a *data* error (:class:`~deploy.exceptions.MessageRejectedError`, or any unexpected
  exception a message provokes): the bytes go to the ``rejected`` table with the reason, an
  alert is raised, one line is logged, and the message is acknowledged;
* a *storage* error (:class:`~deploy.exceptions.ArchiveError`): retried with a back-off; after
  ``ingest.storage_tries`` tries while the database works for other writes, the message is set
  aside too (kind ``storage``).  While the database is down nothing is acknowledged.

After the commit, each device gets one receipt per batch on ``<prefix>/<device>/receipt``
(``omis.receipt/1``): the ``message_id`` s stored (or already stored) and those set aside.  The
device keeps a result in its outbox until then.

A watchdog (:meth:`ArchiveSubscriber.run`) raises :class:`~deploy.exceptions.ServiceError` when
paho's network thread or the writer died, or the writer is stuck; ``omis collect`` then exits
non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from deploy.broker import parse_broker_url
from deploy.collector import storable
from deploy.collector.config import CollectorMqtt, IngestConfig
from deploy.collector.shadow import ShadowArchive, parse_shadow
from deploy.collector.store import (
    CONFLICT,
    DUPLICATE,
    STORED,
    ArchiveStore,
    Rejection,
    utcnow,
)
from deploy.exceptions import ArchiveError, MessageRejectedError, MqttError, ServiceError
from deploy.messages.base import rfc3339
from deploy.messages.receipt import (
    MAX_RECEIPT_IDS,
    ReceiptMessage,
    RejectedId,
    receipt_topic,
)
from deploy.mqtt import configure_tls

log = logging.getLogger(__name__)

RECEIPT_MAX_BYTES = 256 * 1024  # ids and reasons per receipt; well under max_packet_size
RECEIVE_MAXIMUM = 500  # unacknowledged messages the broker may hand this instance at once
STATE_KINDS = ("availability", "status", "ota/state")
REJECTED = "rejected"
SHARED_KINDS = ("result", "shadow")  # one copy per group: results and shadow results
COMMAND_VERBS = ("scan", "cancel")  # sent for the API (POST /api/devices/{id}/<verb>)


@dataclass(frozen=True)
class Inbound:
    """One message as paho handed it over, waiting for the writer."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    connection: int  # which connection it came on: a PUBACK is only valid on that one
    received_at: Any = field(default_factory=utcnow)


@dataclass
class Receipts:
    """What one batch confirms to one device: ids held, and ids set aside (with the reason)."""

    message_ids: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    def messages(self, collector: str) -> Iterator[bytes]:
        """The ``omis.receipt/1`` payloads (:mod:`deploy.messages.receipt`), split by size.

        Each holds at most ``MAX_RECEIPT_IDS`` ids per list and about ``RECEIPT_MAX_BYTES``:
        the broker closes the connection of a client publishing more than its
        ``max_packet_size`` (1 MiB shipped), and a reason may take six bytes a character.
        """
        held: list[str] = []
        aside: list[RejectedId] = []
        size = 0
        items = [(m, None) for m in self.message_ids] + [(m, r[:500]) for m, r in self.rejected]
        for message_id, reason in items:
            if reason is None:
                cost = len(message_id) + 3
            else:
                entry = {"message_id": message_id, "reason": reason}
                cost = len(json.dumps(entry, separators=(",", ":"), allow_nan=False)) + 1
            full = len(held) >= MAX_RECEIPT_IDS or len(aside) >= MAX_RECEIPT_IDS
            if (held or aside) and (full or size + cost > RECEIPT_MAX_BYTES):
                yield _receipt(held, aside, collector)
                held, aside, size = [], [], 0
            if reason is None:
                held.append(message_id)
            else:
                aside.append(RejectedId(message_id=message_id, reason=reason))
            size += cost
        if held or aside:
            yield _receipt(held, aside, collector)


def _receipt(held: list[str], aside: list[RejectedId], collector: str) -> bytes:
    message = ReceiptMessage(
        message_ids=held,
        rejected=aside,
        collector=collector[:128] or "omis-collect",
        at=rfc3339(),
    )
    return json.dumps(message.to_json(), separators=(",", ":"), allow_nan=False).encode()


class _StoppingError(Exception):
    """The service is closing while a message waits for the database: leave it unacknowledged."""


class ArchiveSubscriber:
    """One collector instance's MQTT session, feeding an :class:`ArchiveStore`."""

    def __init__(
        self, config: CollectorMqtt, store: ArchiveStore, ingest: IngestConfig | None = None
    ) -> None:
        self.config = config
        self.ingest = ingest or IngestConfig()
        self.store = store
        self.address = parse_broker_url(config.broker)
        if self.address.scheme == "embedded":
            raise MqttError("mqtt.broker: the collector needs mqtt:// or mqtts://, not embedded")
        self.prefix = config.prefix
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # the broker confirmed the subscriptions
        self.stored = 0
        self.duplicates = 0
        self.conflicts = 0
        self.rejected = 0
        self.rejected_by_device: Counter[str] = Counter()
        self.storage_errors = 0
        self.receipts_sent = 0
        self._client: paho.Client | None = None
        self._network: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._inbox: queue.Queue[Inbound | None] = queue.Queue()
        self._closing = threading.Event()
        self._failed = False  # the watchdog found a dead or stuck thread
        self._connection = 0
        self._busy_since: float | None = None  # the writer's current attempt started then
        self._states: dict[str, Callable[[str, bytes], None]] = {
            "availability": self._on_availability,
            "status": self._on_status,
            "ota/state": self._on_ota_state,
        }
        self.shadow = ShadowArchive(store.engine)  # omis.shadow/1: own table, own module
        self.stored_shadow = 0
        # correlation id -> (reply topic, reply arrived, [the reply]) of the API's commands
        self._waiting: dict[str, tuple[str, threading.Event, list[dict[str, Any]]]] = {}
        self._waiting_lock = threading.Lock()

    @property
    def filters(self) -> list[str]:
        """The subscriptions: results shared by the group, live state per instance."""
        shared = [f"$share/{self.config.group}/{self.prefix}/+/{kind}" for kind in SHARED_KINDS]
        replies = [f"{self.prefix}/+/cmd/{verb}/reply" for verb in COMMAND_VERBS]
        return shared + [f"{self.prefix}/+/{kind}" for kind in STATE_KINDS] + replies

    def _build(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        client.enable_logger(logging.getLogger("deploy.collector.paho"))
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password else None
            client.username_pw_set(cfg.username, password)
        if self.address.tls:
            configure_tls(client, cfg.tls)
        client.reconnect_delay_set(
            max(1, round(cfg.reconnect_min_s)), max(1, round(cfg.reconnect_max_s))
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *_: self.subscribed.set()
        return client

    def start(self) -> None:
        """Start the writer, connect in the background (reconnects by itself until close)."""
        if self._client is not None:
            return
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        client = self._build()
        try:
            client.connect_async(
                self.address.host,
                self.address.port or 1883,
                keepalive=self.config.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.address}: {exc}") from exc
        self._client = client
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        client.loop_start()
        self._network = getattr(client, "_thread", None)

    def problem(self) -> str | None:
        """Why this instance cannot go on (a dead thread, a stuck writer), else None."""
        if self._network is None or not self._network.is_alive():
            return "the MQTT network thread died"
        if self._writer is None or not self._writer.is_alive():
            return "the ingest writer thread died"
        busy = self._busy_since
        if busy is not None and time.monotonic() - busy > self.ingest.stuck_after_s:
            return f"the ingest writer is stuck (no progress for {self.ingest.stuck_after_s:.0f} s)"
        return None

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop``; :class:`ServiceError` when a thread died or the writer is stuck.

        The check runs every ``ingest.watchdog_s`` seconds; in between this thread sleeps, so
        an idle collector costs next to nothing.
        """
        self.start()
        while not stop.wait(self.ingest.watchdog_s):
            trouble = self.problem()
            if trouble is not None:
                self._failed = True
                log.critical(
                    "watchdog: %s; exiting so the supervisor restarts the collector", trouble
                )
                raise ServiceError(f"watchdog: {trouble}")

    def close(self) -> None:
        """Stop the writer, disconnect (the session stays on the broker); idempotent."""
        self._closing.set()
        self._inbox.put(None)
        writer, self._writer = self._writer, None
        if writer is not None:
            # A stuck writer is why the watchdog fired: do not wait for it (daemon thread).
            writer.join(1 if self._failed else 10)
        client, self._client = self._client, None
        if client is not None:
            client.disable_logger()  # paho logs a deliberate disconnect at ERROR once
            client.disconnect()
            client.loop_stop()
        self.connected.clear()

    # paho callbacks (network thread): they only queue, so they cannot fail.

    def _on_connect(
        self, client: paho.Client, _u: Any, flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        self._connection += 1
        log.info(
            "connected to %s as %s (session present: %s)",
            self.address,
            self.config.client_id,
            flags.session_present,
        )
        client.subscribe([(f, 1) for f in self.filters])
        self.connected.set()

    def _on_disconnect(self, _c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.info("disconnected from %s: %s", self.address, reason)

    def _on_message(self, client: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic.endswith("/reply") and "/cmd/" in msg.topic:
            self._on_reply(msg.topic, bytes(msg.payload))
            if msg.qos:  # nothing to store: acknowledged at once
                client.ack(msg.mid, msg.qos)
            return
        item = Inbound(msg.mid, msg.qos, msg.topic, bytes(msg.payload), self._connection)
        self._inbox.put(item)

    # commands for the API (network thread: replies; HTTP threads: command)

    def command(
        self, device: str, verb: str, body: dict[str, Any], timeout_s: float
    ) -> dict[str, Any] | None:
        """Publish ``body`` on ``<prefix>/<device>/cmd/<verb>`` and wait up to ``timeout_s``
        for the reply with its ``correlation_id`` (set by the caller); the reply, or None.

        The command expires on the broker after ``timeout_s`` (MQTT 5 message expiry): a scan
        nobody waits for any more must not start when an offline device comes back.
        :class:`MqttError` when there is no connection or the publish fails.
        """
        client = self._client
        if client is None or not self.connected.is_set():
            raise MqttError(f"not connected to the broker {self.address}")
        correlation = str(body["correlation_id"])
        arrived = threading.Event()
        box: list[dict[str, Any]] = []
        topic = f"{self.prefix}/{device}/cmd/{verb}"
        with self._waiting_lock:
            self._waiting[correlation] = (f"{topic}/reply", arrived, box)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.MessageExpiryInterval = max(1, round(timeout_s))
        payload = json.dumps(body, separators=(",", ":"), allow_nan=False)
        try:
            info = client.publish(topic, payload, qos=1, properties=props)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise MqttError(f"publish failed: {paho.error_string(info.rc)}")
            arrived.wait(timeout_s)
        finally:
            with self._waiting_lock:
                self._waiting.pop(correlation, None)
        return box[0] if box else None

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            reply = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            log.debug("a reply on %s that is not JSON", topic[:200])
            return
        correlation = reply.get("correlation_id") if isinstance(reply, dict) else None
        with self._waiting_lock:
            waiting = self._waiting.get(correlation) if isinstance(correlation, str) else None
        # another requester's reply, one that came too late, or from elsewhere than asked
        if waiting is None or waiting[0] != topic:
            return
        _, arrived, box = waiting
        box.append(reply)
        arrived.set()

    # the writer thread

    def _write_loop(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.ingest.batch_max:  # what piled up during the last commit
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._inbox.put(None)
                    break
                batch.append(more)
            try:
                self._handle(batch)
            except _StoppingError:
                return  # unacknowledged: the broker redelivers after the restart
            finally:
                self._busy_since = None

    def _handle(self, batch: list[Inbound]) -> None:
        """Store a batch (results in one transaction), then acknowledge it and send receipts."""
        self._busy_since = time.monotonic()
        receipts: defaultdict[str, Receipts] = defaultdict(Receipts)
        results: list[tuple[Inbound, dict[str, Any]]] = []
        for item in batch:
            device, kind = self._route(item.topic)
            try:
                if device is None:
                    raise MessageRejectedError(f"topic {item.topic[:200]!r} names no valid device")
                if kind == "result":
                    if item.payload:  # an empty message clears nothing on this topic
                        decoded = storable.decode(item.payload)
                        text = item.payload.decode("utf-8")  # decode() proved it is UTF-8
                        row = storable.result_row(decoded, device, item.received_at, text)
                        results.append((item, row))
                    continue
                self._store_results(results, receipts)
                results = []
                if kind == "shadow":  # omis.shadow/1: its own table (deploy.collector.shadow)
                    self._store_shadow(item, device, receipts)
                    continue
                self._store_state(item, device, kind)
            except MessageRejectedError as exc:
                self._set_aside(item, device, str(exc), "data", receipts)
            except Exception as exc:  # a defect this message provokes must not stop ingest
                log.debug("unexpected error on %s", item.topic[:200], exc_info=True)
                reason = f"unexpected {type(exc).__name__}: {exc}"
                self._set_aside(item, device, reason, "data", receipts)
        self._store_results(results, receipts)
        self._acknowledge(batch)
        self._send_receipts(receipts)

    def _route(self, topic: str) -> tuple[str | None, str]:
        rest = topic[len(self.prefix) + 1 :] if topic.startswith(self.prefix + "/") else ""
        device, _, kind = rest.partition("/")
        try:
            return storable.identifier(device, "device"), kind
        except MessageRejectedError:
            return None, kind

    def _store_results(
        self, results: list[tuple[Inbound, dict[str, Any]]], receipts: dict[str, Any]
    ) -> None:
        if not results:
            return
        rows = [row for _, row in results]
        try:
            outcomes = self.store.add_results(rows, self.prefix)
        except Exception as exc:  # one row may be the cause: find it, store the others
            self.storage_errors += 1
            log.warning("storing %d result(s) at once failed (%s); one by one", len(rows), exc)
            log.debug("batch failure", exc_info=True)
            outcomes = [self._store_one(item, row) for item, row in results]
        for (_, row), outcome in zip(results, outcomes, strict=True):
            self._count(outcome, row["device_id"])
            receipt = receipts[row["device_id"]]
            if outcome == CONFLICT:
                receipt.rejected.append((row["message_id"], "conflict: another result is stored"))
            elif outcome == REJECTED:
                receipt.rejected.append((row["message_id"], "set aside: not storable"))
            else:
                receipt.message_ids.append(row["message_id"])

    def _count(self, outcome: str, device: str) -> None:
        if outcome == STORED:
            self.stored += 1
        elif outcome == DUPLICATE:
            self.duplicates += 1
        elif outcome == CONFLICT:
            self.conflicts += 1
            log.warning("conflict: device %s sent another result under a stored message_id", device)

    def _store_one(self, item: Inbound, row: dict[str, Any]) -> str:
        device, message_id = row["device_id"], row["message_id"]

        def attempt() -> str:
            return self.store.add_results([row], self.prefix)[0]

        def aside(reason: str) -> str:
            self._set_aside(item, device, reason, "storage", None, message_id=message_id)
            return REJECTED

        try:
            return str(self._with_retries(attempt, aside))
        except MessageRejectedError as exc:
            self._set_aside(item, device, str(exc), "data", None, message_id=message_id)
            return REJECTED

    def _store_state(self, item: Inbound, device: str, kind: str) -> None:
        handler = self._states.get(kind)
        if handler is None:
            raise MessageRejectedError(f"topic {item.topic[:200]!r}: not an archived message kind")

        def attempt() -> None:
            handler(device, item.payload)

        def aside(reason: str) -> None:
            self._set_aside(item, device, reason, "storage", None)

        self._with_retries(attempt, aside)

    def _with_retries(self, attempt: Callable[[], Any], aside: Callable[[str], Any] | None) -> Any:
        """``attempt()`` until it works; after ``storage_tries`` failures, ``aside(reason)``.

        While even setting aside fails the database is down, not this message: keep trying
        (with a capped back-off) and acknowledge nothing.  Without ``aside``: try for ever.
        Any other exception is the message's doing: :class:`MessageRejectedError`.
        """
        tries = attempts = 0
        while True:
            self._busy_since = time.monotonic()
            try:
                return attempt()
            except MessageRejectedError:
                raise
            except ArchiveError as exc:
                self.storage_errors += 1
                # A lost connection or a locked database says nothing about this message:
                # only errors of its own statements count towards setting it aside.
                tries += 1 if not _transient(exc) else 0
                if aside is not None and tries >= self.ingest.storage_tries:
                    try:
                        return aside(f"storage: {exc}")
                    except ArchiveError:
                        log.warning("database unavailable (%s); retrying", str(exc)[:300])
                attempts += 1
                backoff = self.ingest.retry_min_s * 2 ** min(attempts - 1, 30)
                delay = min(self.ingest.retry_max_s, backoff)
                if self._closing.wait(delay):
                    raise _StoppingError() from exc
            except Exception as exc:  # a defect this message provokes must not stop ingest
                log.debug("unexpected error on a message", exc_info=True)
                raise MessageRejectedError(f"unexpected {type(exc).__name__}: {exc}") from exc

    def _set_aside(
        self,
        item: Inbound,
        device: str | None,
        reason: str,
        kind: str,
        receipts: dict[str, Any] | None,
        *,
        message_id: str | None = None,
    ) -> None:
        message_id = message_id or _message_id_of(item.payload)
        copy = Rejection(item.topic, item.payload, reason, kind, device, message_id)

        def attempt() -> None:
            self.store.reject([copy])

        self._with_retries(attempt, None)  # a set-aside is the last resort: it never gives up
        self.rejected += 1
        self.rejected_by_device[device or "(unknown)"] += 1
        log.warning("set aside (%s) a message on %s: %s", kind, item.topic[:200], reason[:300])
        if receipts is not None and device is not None and message_id is not None:
            receipts[device].rejected.append((message_id, reason))

    def _acknowledge(self, batch: list[Inbound]) -> None:
        client = self._client
        if client is None:
            return
        for item in batch:
            # A PUBACK belongs to the connection the message came on; after a reconnect the
            # broker redelivers it (stored again as a duplicate) and that copy is acknowledged.
            if item.qos and item.connection == self._connection:
                client.ack(item.mid, item.qos)

    def _send_receipts(self, receipts: dict[str, Receipts]) -> None:
        client = self._client
        if client is None or not self.ingest.receipts:
            return
        for device, ids in receipts.items():
            topic = receipt_topic(self.prefix, device)
            try:
                for body in ids.messages(self.config.client_id):
                    client.publish(topic, body, qos=1, retain=False)
                    self.receipts_sent += 1
            except Exception:  # the batch is stored: a lost receipt only means a resend
                log.exception("receipt for device %s could not be sent", device)

    def _store_shadow(self, item: Inbound, device: str, receipts: dict[str, Receipts]) -> None:
        """A shadow result: parsed (one claiming another device is a data error, set aside),
        stored with the same retries as results, confirmed in the device's receipt (the
        device's outbox keeps it until then)."""
        if not item.payload:
            return
        try:
            message = parse_shadow(device, storable.decode(item.payload))
        except ValueError as exc:
            raise MessageRejectedError(str(exc)) from None
        text = item.payload.decode("utf-8")  # decode() proved it is UTF-8

        def attempt() -> bool:
            return self.shadow.store(message, text)

        def aside(reason: str) -> None:
            self._set_aside(item, device, reason, "storage", receipts)

        stored = self._with_retries(attempt, aside)
        if stored is None:
            return  # set aside (and named in the receipt)
        if stored:
            self.stored_shadow += 1
        else:
            self.duplicates += 1
        receipts[device].message_ids.append(message.message_id)

    def _on_availability(self, device: str, payload: bytes) -> None:
        self.store.set_availability(device, storable.availability(payload))

    def _on_status(self, device: str, payload: bytes) -> None:
        self.store.set_status(device, storable.state_document(payload, "status", device))

    def _on_ota_state(self, device: str, payload: bytes) -> None:
        self.store.set_ota_state(device, storable.state_document(payload, "ota/state", device))


def _transient(exc: ArchiveError) -> bool:
    """True for a database that is unreachable or busy (not this message's fault)."""
    cause = exc.__cause__
    return isinstance(cause, OperationalError | InterfaceError | DisconnectionError)


def _message_id_of(payload: bytes) -> str | None:
    """The ``message_id`` of a payload set aside, when it has a well-formed one."""
    try:  # leniently: the payload was set aside because something in it is wrong
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    value = data.get("message_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) and storable.UUID_RE.match(value) else None
