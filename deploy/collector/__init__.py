"""``omis collect``: the result archive (docs/collector.md).

A persistent MQTT 5 session with a shared subscription stores every ``omis.result/1`` exactly
once (unique ``message_id``) through SQLAlchemy Core (SQLite by default, PostgreSQL at scale),
keeps the fleet's live state, records alerts (``seq`` gaps, high-risk results, devices going
offline) and serves them over an HTTP API (FastAPI on uvicorn) and the dashboard.

Modules: ``config`` (typed configuration), ``store`` (tables, ingest, queries),
``outcome`` (the result's outcome and review flag), ``ingest`` (the MQTT side),
``auth`` (accounts), ``api`` (HTTP routes) with ``api_models`` (response models),
``http_params`` (bounded parameters) and ``http_security`` (headers, allowed hosts, docs
behind the login), ``fhir`` (FHIR R4 export), ``service`` (runs it all).
"""
