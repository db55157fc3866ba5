"""Receiving an offered bundle: a local path, an HTTPS download or inline MQTT chunks.

Runs on the OTA worker.  Inline chunks arrive on the MQTT network thread
(:meth:`OtaReceiver.on_chunk`, cheap: queued) and are assembled here; missing ones are asked
for again on ``ota/need/<transfer>``.  :class:`~deploy.ota.delivery.ChunkAssembler` keeps each
chunk on disk, so a re-sent offer of the same transfer resumes; a bad chunk is dropped and asked
for again, never fatal.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.ota.delivery import (
    ChunkAssembler,
    InlineSource,
    OtaOffer,
    PathSource,
    UrlSource,
    archive_path,
    check_matches_offer,
    fetch_url,
    need_topic,
    parse_chunk_topic,
)
from deploy.ota.exceptions import DeliveryError

log = logging.getLogger(__name__)

CHUNK_QUEUE = 64  # chunks waiting for the worker; beyond this they are dropped and re-requested
MAX_CORRUPT = 2  # whole-transfer sha256 failures tolerated before the offer is refused
POLL_S = 0.2


@dataclass(frozen=True)
class TransferSettings:
    """Timeouts of a transfer."""

    need_after_s: float = 5.0  # no chunk for this long while some are missing: ask again
    transfer_timeout_s: float = 300.0  # no chunk for this long: the offer is refused
    fetch_timeout_s: float = 60.0  # HTTPS download socket timeout


class OtaReceiver:
    """Gets the bundle of one offer at a time into ``work_dir``."""

    def __init__(
        self,
        work_dir: Path,
        settings: TransferSettings,
        publish: Callable[[str, bytes], None],
        prefix: str,
        device_id: str,
    ) -> None:
        self.work_dir = work_dir
        self.settings = settings
        self.publish = publish  # (topic, payload): QoS 1, not retained
        self.prefix = prefix
        self.device_id = device_id
        self.transfer: str | None = None  # the inline transfer expected now
        self._chunks: queue.Queue[tuple[str, bytes]] = queue.Queue(CHUNK_QUEUE)

    def expect(self, offer: OtaOffer | None) -> None:
        """Accept chunks of ``offer``'s inline transfer from now on (None: of none)."""
        source = None if offer is None else offer.source
        self.transfer = source.transfer_id if isinstance(source, InlineSource) else None
        if offer is None:
            while True:
                try:
                    self._chunks.get_nowait()
                except queue.Empty:
                    return

    def on_chunk(self, topic: str, payload: bytes) -> None:
        """An inline chunk arrived (network thread): queue it, or drop it when not expected."""
        try:
            transfer, _ = parse_chunk_topic(topic)
        except DeliveryError:
            log.debug("ota: ignoring %s", topic)
            return
        if transfer != self.transfer:
            log.debug("ota: chunk of transfer %s, which is not running", transfer)
            return
        try:
            self._chunks.put_nowait((topic, payload))
        except queue.Full:
            log.warning("ota: chunk queue full; %s dropped (it will be asked for again)", topic)

    def receive(self, offer: OtaOffer, stop: Callable[[], bool]) -> Path:
        """The offered bundle, checked against the offer's size, sha256 and manifest bytes.

        The archive is named by the offer's correlation id, validated and kept under
        ``work_dir``; when the offer is refused nothing received stays behind.
        """
        source = offer.source
        if isinstance(source, PathSource):
            out = Path(source.path)
            check_matches_offer(out, offer)
            return out
        out = archive_path(self.work_dir, offer)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            if isinstance(source, UrlSource):
                fetch_url(source, out, self.settings.fetch_timeout_s)
            else:
                self._receive_inline(out, source, stop)
            check_matches_offer(out, offer)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out

    def _receive_inline(self, out: Path, source: InlineSource, stop: Callable[[], bool]) -> Path:
        asm = ChunkAssembler(self.work_dir / "chunks", source)
        need = need_topic(self.prefix, self.device_id, source.transfer_id)
        corrupt = 0
        last_chunk = last_need = time.monotonic()
        while True:
            if stop():
                raise DeliveryError("the appliance is stopping")
            try:
                topic, payload = self._chunks.get(timeout=POLL_S)
            except queue.Empty:
                idle = time.monotonic() - last_chunk
                if idle > self.settings.transfer_timeout_s:
                    raise DeliveryError(
                        f"transfer incomplete: {len(asm.missing())} chunk(s) missing after "
                        f"{idle:.0f} s without data"
                    ) from None
                if time.monotonic() - last_need > self.settings.need_after_s:
                    self.publish(need, asm.need_payload())
                    last_need = time.monotonic()
                continue
            last_chunk = time.monotonic()
            _, index = parse_chunk_topic(topic)
            try:
                asm.add(index, payload)
            except DeliveryError as exc:
                log.warning("ota: %s", exc)
                continue
            missing = asm.missing()
            if missing and index == source.chunks - 1:
                self.publish(need, asm.need_payload())  # the tail came, gaps remain
                last_need = time.monotonic()
            if missing:
                continue
            try:
                return asm.assemble(out)
            except DeliveryError:
                corrupt += 1
                if corrupt >= MAX_CORRUPT:
                    raise
                self.publish(need, asm.need_payload())  # every chunk again


OFFER_SCHEMA_ID = "https://omis.example/schemas/omis.ota_offer/1"


def offer_json_schema() -> dict[str, Any]:
    """``deploy/schemas/cmd_ota.json``: the JSON Schema of :class:`OtaOffer` (draft 2020-12).

    Generated from the pydantic model, with ``kind`` required in every source (pydantic's
    discriminated union needs it) and the OpenAPI-only ``discriminator`` keyword left out.
    """
    schema = OtaOffer.model_json_schema(by_alias=True)
    for name in ("PathSource", "UrlSource", "InlineSource"):
        definition = schema["$defs"][name]
        definition["required"] = ["kind", *definition.get("required", [])]
    schema["properties"]["source"].pop("discriminator", None)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": OFFER_SCHEMA_ID,
        "title": "cmd/ota - omis.ota_offer/1, a signed model offer (deploy.ota.delivery.OtaOffer)",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def chunk_filter(base_topic: str) -> str:
    """Subscription for the inline chunks of one device."""
    return f"{base_topic}/ota/chunk/#"
