"""Every message that crosses a process boundary, as one pydantic model each.

The device builds its payloads with these models, the archive parses with the same models, and
every shipped JSON Schema in ``deploy/schemas/`` is generated from them
(``python -m deploy.messages --write``; a test fails on drift).

========================  ==============================  =====================================
topic (under prefix/dev)  schema                           model
========================  ==============================  =====================================
``result``                ``omis.result/1``                :class:`.result.ResultMessage`
``status``                ``omis.status/1``                :class:`.status.StatusMessage`
``metrics``               ``omis.metrics/1``               :class:`.metrics.MetricsMessage`
``cmd/<verb>/reply``      ``omis.reply/1``                 :class:`.reply.ReplyMessage`
``cmd/scan``              (command)                        :class:`.commands.ScanCommand`
``cmd/cancel``            (command)                        :class:`.commands.CancelCommand`
``cmd/status``            (command)                        :class:`.commands.StatusCommand`
``cmd/ota``               ``omis.ota_offer/1``             ``deploy.ota.delivery.OtaOffer``
``ota/state``             ``omis.ota_state/1``             :class:`.ota_state.OtaStateMessage`
``availability``          plain text                       :class:`.availability.Availability`
``receipt`` (to device)   ``omis.receipt/1``               :class:`.receipt.ReceiptMessage`
========================  ==============================  =====================================

Modules: :mod:`.identifiers` (the one rule for device, slide, scan and correlation ids),
:mod:`.vocabulary` (outcomes, reasons, stages, states, error codes), :mod:`.migrations` (older
result payloads upgraded step by step), :mod:`.parsing` (received bytes to a typed message),
:mod:`.catalog` (schema generation), :mod:`.testing` (builders for tests).  This ``__init__``
imports nothing, so any module can use one part without loading the rest.
"""
