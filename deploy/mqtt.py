"""The MQTT link (paho-mqtt 2.x, callback API v2, MQTT 5 by default) and the outbox pump.

:class:`MqttLink` owns one paho client for the life of the process: paho reconnects with an
exponential, capped back-off and re-sends its own unacknowledged QoS 1 publishes after a
reconnect, so within one process every result is published once per connection at most.
On every (re)connect it publishes ``online`` (retained), re-subscribes to the command topics (plus
any ``extra_filters``, e.g. OTA chunks) and calls ``on_online`` so the service republishes its
retained status.  The last will is
``offline``; :meth:`MqttLink.close` publishes ``stopped`` before disconnecting.

:class:`OutboxPump` moves rows from the durable :class:`~deploy.outbox.Outbox` to the broker in
FIFO order with at most ``max_inflight`` unacknowledged, and deletes a row only when its PUBACK
arrives.  A row the broker refuses (MQTT 5 PUBACK reason >= 0x80, e.g. an ACL) stays in the outbox
and is published again after a capped exponential back-off, without waiting for a restart.
After a restart it starts again from the oldest row, so every result is delivered at least once;
duplicates carry the same ``message_id``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from deploy.broker import BrokerAddress
from deploy.config import MqttConfig, TlsConfig
from deploy.exceptions import MqttError
from deploy.outbox import Outbox, OutboxItem

if TYPE_CHECKING:
    from deploy.messages.receipt import ReceiptMessage

log = logging.getLogger(__name__)

AVAILABILITY_ONLINE = "online"
AVAILABILITY_STOPPED = "stopped"
AVAILABILITY_OFFLINE = "offline"
QOS = 1
RECEIPT_SLACK_S = 2.0  # shared-subscription instances confirm slightly out of order
RETRY_MIN_S = 1.0  # first re-publish of a refused result
RETRY_MAX_S = 60.0  # back-off cap, so an ACL mistake does not turn into a publish storm

CommandCallback = Callable[[str, bytes, "Properties | None"], None]


@dataclass(frozen=True)
class Topics:
    """The topic tree of one device: ``<prefix>/<device>/...``."""

    prefix: str
    device_id: str

    @property
    def base(self) -> str:
        """``<prefix>/<device>``."""
        return f"{self.prefix}/{self.device_id}"

    @property
    def availability(self) -> str:
        """online / stopped / offline, retained."""
        return f"{self.base}/availability"

    @property
    def status(self) -> str:
        """omis.status/1, retained."""
        return f"{self.base}/status"

    @property
    def result(self) -> str:
        """omis.result/1, one per slide."""
        return f"{self.base}/result"

    @property
    def shadow(self) -> str:
        """omis.shadow/1, one per slide while a shadow candidate is held (QoS 1)."""
        return f"{self.base}/shadow"

    @property
    def ota_state(self) -> str:
        """OTA state, retained (published by the OTA component)."""
        return f"{self.base}/ota/state"

    @property
    def metrics(self) -> str:
        """omis.metrics/1, QoS 0."""
        return f"{self.base}/metrics"

    @property
    def receipt(self) -> str:
        """omis.receipt/1 from the archive: message_ids it stored or set aside (QoS 1)."""
        return f"{self.base}/receipt"

    @property
    def command_filter(self) -> str:
        """Subscription for every command verb of this device."""
        return f"{self.base}/cmd/+"

    def command(self, verb: str) -> str:
        """Topic of command ``verb``."""
        return f"{self.base}/cmd/{verb}"

    def reply(self, verb: str) -> str:
        """Topic of the replies to command ``verb``."""
        return f"{self.base}/cmd/{verb}/reply"

    def verb_of(self, topic: str) -> str | None:
        """The verb of a command topic of this device, else None."""
        head = f"{self.base}/cmd/"
        if not topic.startswith(head):
            return None
        verb = topic[len(head) :]
        return verb if verb and "/" not in verb else None


def configure_tls(client: paho.Client, tls: TlsConfig) -> None:
    """Load the client's CA, certificate and key (``mqtt.tls``); one-line :class:`MqttError`."""
    passphrase = tls.key_passphrase.get_secret_value() if tls.key_passphrase else None
    try:
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            keyfile_password=passphrase,
            cert_reqs=ssl.CERT_REQUIRED,
        )
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise MqttError(f"mqtt.tls: cannot load certificates: {exc}") from exc
    client.tls_insecure_set(tls.insecure)


def _is_failure(reason: ReasonCode | int | None) -> bool:
    if reason is None:
        return False
    if isinstance(reason, ReasonCode):
        return bool(reason.is_failure)
    return int(reason) >= 0x80


class MqttLink:
    """One paho client with availability, command intake and PUBACK notification."""

    def __init__(
        self,
        config: MqttConfig,
        address: BrokerAddress,
        topics: Topics,
        *,
        on_command: CommandCallback | None = None,
        on_online: Callable[[], None] | None = None,
        extra_filters: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.address = address
        self.topics = topics
        self.on_command = on_command
        self.on_online = on_online
        self.extra_filters = tuple(extra_filters)  # subscribed beside cmd/+ on every connect
        self.on_puback: Callable[[int, bool], None] | None = None
        self.on_receipt: Callable[[bytes], None] | None = None  # set: subscribe to receipts
        self.connected = threading.Event()
        self.connects = 0
        self._client: paho.Client | None = None

    @property
    def mqtt5(self) -> bool:
        """True when speaking MQTT 5."""
        return self.config.protocol == "mqttv5"

    def _build_client(self) -> paho.Client:
        cfg = self.config
        protocol = MQTTProtocolVersion.MQTTv5 if self.mqtt5 else MQTTProtocolVersion.MQTTv311
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"omis-{self.topics.device_id}",
            protocol=protocol,
            clean_session=None if self.mqtt5 else True,
        )
        client.enable_logger(logging.getLogger("deploy.mqtt.paho"))
        client.will_set(self.topics.availability, AVAILABILITY_OFFLINE, qos=QOS, retain=True)
        if cfg.username is not None:
            password = cfg.password.get_secret_value() if cfg.password else None
            client.username_pw_set(cfg.username, password)
        if self.address.tls:
            configure_tls(client, self.config.tls)
        client.reconnect_delay_set(
            max(1, round(cfg.reconnect_min_s)), max(1, round(cfg.reconnect_max_s))
        )
        client.max_inflight_messages_set(cfg.max_inflight)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def start(self) -> None:
        """Connect in the background; reconnects forever until :meth:`close`."""
        if self._client is not None:
            return
        client = self._build_client()
        try:
            client.connect_async(
                self.address.host, self.address.port or 1883, keepalive=self.config.keepalive_s
            )
        except (OSError, ValueError) as exc:
            raise MqttError(f"cannot connect to {self.address}: {exc}") from exc
        self._client = client
        client.loop_start()
        log.info("MQTT: connecting to %s as %s", self.address, self.topics.device_id)

    def wait_connected(self, timeout_s: float) -> bool:
        """True once connected within ``timeout_s``."""
        return self.connected.wait(timeout_s)

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        qos: int = QOS,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> int:
        """Queue one publish; returns paho's message id (paho keeps QoS 1 until PUBACK)."""
        if self._client is None:
            raise MqttError("MQTT link is not started")
        info = self._client.publish(
            topic, payload, qos=qos, retain=retain, properties=properties if self.mqtt5 else None
        )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        return int(info.mid)

    def reply_properties(self, correlation: bytes | None) -> Properties | None:
        """MQTT 5 properties echoing a request's correlation data."""
        if not self.mqtt5 or correlation is None:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.CorrelationData = correlation
        return props

    def response_topic(self, properties: Properties | None) -> str | None:
        """A request's MQTT 5 Response Topic when it is usable, else None.

        Wildcards, empty topics and ``$``-topics are refused: a reply can only go to a topic a
        client could name in PUBLISH.
        """
        topic = getattr(properties, "ResponseTopic", None) if properties is not None else None
        if not self.mqtt5 or not isinstance(topic, str):
            return None
        if not topic or topic.startswith("$") or "+" in topic or "#" in topic or "\0" in topic:
            log.warning("MQTT: ignoring unusable response topic %r", topic[:200])
            return None
        return topic

    def close(self, timeout_s: float = 5.0, availability: str = AVAILABILITY_STOPPED) -> None:
        """Publish ``availability`` (retained; ``stopped`` on a clean exit, ``offline`` after
        an exit in ``error``), disconnect cleanly and stop the loop (idempotent)."""
        client, self._client = self._client, None
        if client is None:
            return
        if self.connected.is_set():
            info = client.publish(self.topics.availability, availability, QOS, True)
            try:
                info.wait_for_publish(timeout_s)
            except (RuntimeError, ValueError):
                log.warning("MQTT: %r could not be published", availability)
        # paho's network thread logs "Client is not connected" at ERROR once after every
        # deliberate disconnect; nothing after this point is a fault worth reporting.
        client.disable_logger()
        client.disconnect()
        client.loop_stop()
        log.debug("MQTT: disconnected from %s", self.address)
        self.connected.clear()

    # paho callbacks (network thread): never let an exception escape into paho.

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if _is_failure(reason):
            log.error("MQTT: connection refused by %s: %s", self.address, reason)
            return
        self.connects += 1
        log.info("MQTT: connected to %s (connection %d)", self.address, self.connects)
        client.publish(self.topics.availability, AVAILABILITY_ONLINE, QOS, True)
        filters = [self.topics.command_filter, *self.extra_filters]
        if self.on_receipt is not None:
            filters.append(self.topics.receipt)
        client.subscribe([(topic, QOS) for topic in filters])
        self.connected.set()
        if self.on_online is not None:
            try:
                self.on_online()
            except Exception:
                log.exception("MQTT: on_online hook failed")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: Any,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        # A disconnect we asked for (reason 0) is routine; anything else is worth a warning.
        level = logging.INFO if reason.value == 0 else logging.WARNING
        log.log(level, "MQTT: disconnected from %s: %s", self.address, reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        if msg.topic == self.topics.receipt and self.on_receipt is not None:
            try:
                self.on_receipt(bytes(msg.payload))
            except Exception:
                log.exception("MQTT: receipt could not be handled")
            return
        if self.on_command is None:
            return
        try:
            props = getattr(msg, "properties", None)
            self.on_command(msg.topic, bytes(msg.payload), props)
        except Exception:
            # A bad message must never take the daemon down; the handler replies on its own.
            log.exception("MQTT: command on %s could not be handled", msg.topic)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self.on_puback is None:
            return
        try:
            self.on_puback(mid, not _is_failure(reason))
        except Exception:
            log.exception("MQTT: PUBACK handling failed for mid %d", mid)


class OutboxPump:
    """Publishes outbox rows in order, ``max_inflight`` at a time; deletes them on PUBACK."""

    def __init__(
        self,
        outbox: Outbox,
        link: MqttLink,
        max_inflight: int,
        retry_min_s: float = RETRY_MIN_S,
        retry_max_s: float = RETRY_MAX_S,
        *,
        receipts: bool = False,
        receipt_timeout_s: float = 300.0,
    ) -> None:
        self.outbox = outbox
        self.link = link
        self.max_inflight = max_inflight
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.receipts = receipts  # keep rows after PUBACK until the archive's receipt
        self.receipt_timeout_s = receipt_timeout_s
        self.published = 0
        self.acked = 0
        self.rejected = 0
        self.receipted = 0  # rows deleted on the archive's receipt
        self.resent = 0  # rows published again because their receipt was overdue
        self._receipt_ids: list[str] = []
        self._next_overdue = 0.0
        self._last_receipt = -float("inf")  # monotonic time of the last receipt
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox row id
        self._early: dict[int, bool] = {}  # PUBACKs that beat their bookkeeping
        # True while the pump thread is inside link.publish(): only then can an unknown mid be
        # the result being sent.  Other PUBACKs (status, replies, metrics share the link) are
        # not kept, or one could match a result's reused mid after paho's 16-bit wrap.
        self._sending = False
        self._acked_rows: list[int] = []
        self._cursor = 0  # highest row id handed to paho in this process
        self._retry_at: dict[int, float] = {}  # refused row id -> monotonic time of next try
        self._refusals: dict[int, int] = {}  # refused row id -> refusals so far (back-off)
        self._stale: dict[int, int] = {}  # mid -> row id, in flight before the last reconnect
        self._connection = 0  # the link's connection count the cursor belongs to

    def notify(self) -> None:
        """Wake the pump (a row was added)."""
        self._wake.set()

    def reconnected(self) -> None:
        """The link came (back) up: wake the pump, which replays from the start.

        paho re-sends its own in-flight messages after a reconnect, but not in every case (a
        broker restart can leave some never re-sent), and the pump would wait for their PUBACK
        for ever.  So the outbox is the truth: everything not yet acknowledged goes out again
        with its message_id (consumers de-duplicate).  A late PUBACK for an old mid still
        acknowledges its row.

        The replay itself is keyed on the link's connection count (:meth:`_fill`), not on this
        call: the link is connected before its ``on_online`` hook runs, so a replay started
        from here could reset the cursor after the pump already sent the first row on the new
        connection -- and that row would go out twice on a healthy link.
        """
        self._wake.set()

    def _start_replay(self) -> None:
        with self._lock:
            self._stale = dict(self._inflight)
            self._inflight.clear()
            self._early.clear()
        self._cursor = 0

    def on_puback(self, mid: int, ok: bool) -> None:
        """PUBACK callback (network thread): remember it, let the pump thread delete."""
        with self._lock:
            rowid = self._inflight.pop(mid, None)
            if rowid is None:
                rowid = self._stale.pop(mid, None)
                if rowid is not None:  # from before the reconnect; the row was re-sent anyway
                    if ok:
                        self._acked_rows.append(rowid)
                    return
                if self._sending:
                    self._early[mid] = ok
                return
            self._settle(rowid, ok)
        self._wake.set()

    def _settle(self, rowid: int, ok: bool) -> None:
        if ok:
            self._acked_rows.append(rowid)
            self._refusals.pop(rowid, None)
            return
        # The broker refused it (e.g. ACL): keep it and try again later, backing off.
        self.rejected += 1
        refusals = self._refusals.get(rowid, 0) + 1
        self._refusals[rowid] = refusals
        delay = min(self.retry_max_s, self.retry_min_s * 2 ** (refusals - 1))
        self._retry_at[rowid] = time.monotonic() + delay
        log.error(
            "MQTT: broker refused outbox row %d (%d time(s)); kept, retried in %.0f s",
            rowid,
            refusals,
            delay,
        )

    @property
    def inflight(self) -> int:
        """Publishes waiting for their PUBACK."""
        with self._lock:
            return len(self._inflight)

    def on_receipt(self, payload: bytes) -> None:
        """An ``omis.receipt/1`` (network thread): remember its ids, let the pump delete them."""
        receipt = parse_receipt(payload)
        if receipt is None:
            log.warning("MQTT: ignoring a malformed receipt (%d bytes)", len(payload))
            return
        ids = _ids_of(receipt)
        if receipt.rejected:  # kept by the archive, never resent: say why, not silently
            first = receipt.rejected[0]
            log.warning(
                "MQTT: the archive set aside %d result(s), not resent (%s: %s)",
                len(receipt.rejected),
                first.message_id,
                first.reason,
            )
        with self._lock:
            self._receipt_ids.extend(ids)
        self._wake.set()

    def _flush_acks(self) -> None:
        with self._lock:
            rows, self._acked_rows = self._acked_rows, []
            receipted, self._receipt_ids = self._receipt_ids, []
        if rows:
            unique = sorted(set(rows))
            if self.receipts:
                self.outbox.mark_sent(unique)
                self.acked += len(unique)
            else:
                self.acked += self.outbox.ack(unique)
        if receipted:
            self.receipted += self.outbox.receipt(receipted)
            self._last_receipt = time.monotonic()

    def _overdue(self, room: int) -> list[OutboxItem]:
        """Sent rows whose receipt is overdue (checked every few seconds, not every wake-up)."""
        now = time.monotonic()
        if not self.receipts or room <= 0 or now < self._next_overdue:
            return []
        self._next_overdue = now + min(5.0, self.receipt_timeout_s / 4)
        cutoff = time.time() - self.receipt_timeout_s
        if now - self._last_receipt < self.receipt_timeout_s:
            # Receipts are flowing: the archive is catching up on a backlog, not losing it.
            # Only rows sent before the newest confirmed one were skipped (lost on the way);
            # resending the rest would only feed the backlog with duplicates.
            cutoff = min(cutoff, self.outbox.newest_receipted_sent_at - RECEIPT_SLACK_S)
        items = self.outbox.overdue(cutoff, room)
        if items:
            # Stamped now, so the next check waits a full timeout again for these.
            self.outbox.mark_sent([item.rowid for item in items])
            self.resent += len(items)
            log.warning("MQTT: no receipt for %d sent result(s); publishing again", len(items))
        return items

    def _due_retries(self, room: int) -> list[OutboxItem]:
        """Refused rows whose back-off has passed (rows acknowledged meanwhile are skipped)."""
        now = time.monotonic()
        with self._lock:
            due = sorted(rowid for rowid, at in self._retry_at.items() if at <= now)[:room]
            for rowid in due:
                del self._retry_at[rowid]
        items = []
        for rowid in due:
            found = self.outbox.pending(after_rowid=rowid - 1, limit=1)
            if found and found[0].rowid == rowid:
                items.append(found[0])
            else:
                with self._lock:
                    self._refusals.pop(rowid, None)
        return items

    def _send(self, item: OutboxItem) -> None:
        with self._lock:
            self._sending = True
        try:
            mid = self.link.publish(item.topic, item.payload, qos=QOS)
        except BaseException:
            with self._lock:
                self._sending = False
                self._early.clear()
            raise
        # One critical section: a PUBACK arriving after it finds the mid in _inflight.
        with self._lock:
            self._sending = False
            early = self._early.pop(mid, None)
            self._early.clear()
            if early is None:
                self._inflight[mid] = item.rowid
            else:
                self._settle(item.rowid, early)
        self.published += 1

    def _fill(self) -> int:
        if not self.link.connected.is_set():
            return 0
        # The link counts a connection before it sets ``connected``, so a pump that sees the
        # link up also sees that connection's number: exactly one replay per connection.
        connection = self.link.connects
        if connection != self._connection:
            self._connection = connection
            self._start_replay()
        room = self.max_inflight - self.inflight
        if room <= 0:
            return 0
        retries = self._due_retries(room) + self._overdue(room)
        for item in retries:
            self._send(item)
        items = self.outbox.pending(after_rowid=self._cursor, limit=max(0, room - len(retries)))
        for item in items:
            self._cursor = item.rowid
            if item.rowid in self._retry_at:  # refused, waiting for its back-off
                continue
            self._send(item)
        return len(retries) + len(items)

    def run(self, stop: threading.Event) -> None:
        """Worker loop: until ``stop`` is set, flush acknowledgements and refill the window."""
        while not stop.is_set():
            self._flush_acks()
            if self._fill():
                continue
            self._wake.wait(0.5)
            self._wake.clear()
        self._flush_acks()

    def wait_receipts(self, message_ids: Sequence[str], timeout_s: float) -> bool:
        """Wait until the archive's receipts removed ``message_ids`` or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        waiting = list(message_ids)
        while waiting:
            waiting = [m for m in waiting if self.outbox.state_of(m) is not None]
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        return not waiting

    def drain(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (all acknowledged) or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox.stats().rows == 0:
                return True
            time.sleep(0.05)
        return self.outbox.stats().rows == 0


def parse_receipt(payload: bytes) -> ReceiptMessage | None:
    """The ``omis.receipt/1`` in ``payload``; None when it is not a valid one."""
    from deploy.messages.parsing import MessageError, parse_message
    from deploy.messages.receipt import ReceiptMessage

    try:
        receipt = parse_message("receipt", payload)
    except MessageError:
        return None
    return receipt if isinstance(receipt, ReceiptMessage) else None


def _ids_of(receipt: ReceiptMessage) -> list[str]:
    return [*receipt.message_ids, *(r.message_id for r in receipt.rejected)]


def receipt_ids(payload: bytes) -> list[str] | None:
    """The ``message_id`` s an ``omis.receipt/1`` confirms (stored and set aside), else None."""
    receipt = parse_receipt(payload)
    return None if receipt is None else _ids_of(receipt)
