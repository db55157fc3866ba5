"""The archive's store and queries on SQLite and on a real PostgreSQL (started by the tests)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from collector_support import database_url, make_result, postgres_server  # noqa: F401
from sqlalchemy import Engine

from deploy.collector.db import migrate, open_engine
from deploy.collector.outcome import outcome_of
from deploy.collector.queries import ArchiveQueries, ResultFilter
from deploy.collector.store import ArchiveStore, parse_time
from deploy.collector.tables import metadata
from deploy.exceptions import ArchiveError
from deploy.messages.testing import status_message


@pytest.fixture
def engine(db_url: str) -> Any:
    engine = open_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


def open_gaps(queries: ArchiveQueries) -> list[tuple[int, int]]:
    return sorted(
        (a["seq_from"], a["seq_to"])
        for a in queries.alerts(open_only=True)
        if a["kind"] == "seq_gap"
    )


def test_migrations_match_the_tables(engine: Engine) -> None:
    migrate(engine)  # a second run is a no-op
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_each_result_is_stored_once(engine: Engine) -> None:
    store, queries = ArchiveStore(engine), ArchiveQueries(engine)
    first = make_result(1)
    assert store.add_result(first) is True
    assert store.add_result(first) is False  # a redelivery with the same message_id
    assert store.add_result(make_result(2)) is True
    total, items = queries.list_results(ResultFilter(), 10)
    assert total == 2
    assert [i["seq"] for i in items] == [2, 1] or {i["seq"] for i in items} == {1, 2}


def test_concurrent_writers_store_each_result_once(engine: Engine) -> None:
    results = [make_result(seq) for seq in range(1, 41)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        store = ArchiveStore(engine)
        try:
            for r in results[offset:] + results[:offset]:  # both writers try every result
                store.add_result(r)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    queries = ArchiveQueries(engine)
    assert queries.list_results(ResultFilter(), 100)[0] == 40
    assert open_gaps(queries) == []


def test_seq_gaps_are_alerts_until_filled(engine: Engine) -> None:
    store, queries = ArchiveStore(engine), ArchiveQueries(engine)
    for seq in (1, 2, 6):
        store.add_result(make_result(seq))
    assert open_gaps(queries) == [(3, 5)]
    store.add_result(make_result(4))  # a late arrival splits the gap
    assert open_gaps(queries) == [(3, 3), (5, 5)]
    store.add_result(make_result(3))
    store.add_result(make_result(5))
    assert open_gaps(queries) == []
    store.add_result(make_result(3, boot="boot-2"))  # a new boot starts at 1
    assert open_gaps(queries) == [(1, 2)]


def test_alerts_for_high_risk_and_offline_and_decommissioning(engine: Engine) -> None:
    store, queries = ArchiveStore(engine), ArchiveQueries(engine)
    store.add_result(make_result(1, p_high=0.93))
    store.add_result(make_result(2, p_high=0.6, abstained=True))  # review, not an alarm
    kinds = [a["kind"] for a in queries.alerts()]
    assert kinds == ["high_risk"]
    store.set_availability("scope-07", "online")
    store.set_availability("scope-07", "offline")
    store.set_availability("scope-07", "offline")  # the other instance, or a retained copy
    offline = [a for a in queries.alerts(open_only=True) if a["kind"] == "offline"]
    assert len(offline) == 1
    store.set_availability("scope-07", "online")
    assert [a for a in queries.alerts(open_only=True) if a["kind"] == "offline"] == []
    assert [d["device_id"] for d in queries.devices()] == ["scope-07"]
    store.set_availability("scope-07", "")  # decommissioned: retained topics cleared
    store.set_status("scope-07", None)
    store.set_ota_state("scope-07", None)
    assert queries.devices() == []
    assert queries.list_results(ResultFilter(device="scope-07"), 10)[0] == 2  # history stays


def test_status_never_goes_back_in_time(engine: Engine) -> None:
    store, queries = ArchiveStore(engine), ArchiveQueries(engine)
    for state, at in (
        ("scanning", "2026-01-01T12:00:05.000Z"),
        ("idle", "2026-01-01T12:00:01.000Z"),
    ):
        store.set_status("scope-07", status_message(state, at=at).to_json())
    assert queries.devices()[0]["status"]["state"] == "scanning"


def test_filters_and_paging(engine: Engine) -> None:
    store, queries = ArchiveStore(engine), ArchiveQueries(engine)
    for seq in range(1, 11):
        store.add_result(
            make_result(
                seq,
                device="scope-07" if seq % 2 else "scope-08",
                p_high=0.9 if seq % 3 == 0 else 0.1,
                abstained=seq == 5,
                finished_at=f"2026-01-01T12:00:{seq:02d}.000Z",
            )
        )
    assert queries.list_results(ResultFilter(device="scope-08"), 100)[0] == 5
    assert queries.list_results(ResultFilter(risk="high"), 100)[0] == 3
    assert queries.list_results(ResultFilter(outcome="abstained", review=True), 100)[0] == 1
    assert queries.list_results(ResultFilter(review=False), 100)[0] == 9
    since, until = parse_time("2026-01-01T12:00:03Z"), parse_time("2026-01-01T13:00:06+01:00")
    window = queries.list_results(ResultFilter(since=since, until=until), 100)[1]
    assert [r["seq"] for r in window] == [5, 4, 3]
    assert [r["slide_id"] for r in queries.list_results(ResultFilter(slide="s-001"), 100)[1]] == [
        "S-0010"
    ]
    total, page = queries.list_results(ResultFilter(), 3, offset=3)
    assert total == 10
    assert [r["seq"] for r in page] == [7, 6, 5]
    assert page[2]["outcome"] == "abstained"
    assert page[2]["finished_at"] == "2026-01-01T12:00:05.000Z"


def test_stated_outcome_wins_and_old_results_derive_it() -> None:
    old = make_result(1, abstained=True)
    assert outcome_of(old).kind == "abstained"
    assert outcome_of(old).reason
    assert outcome_of(make_result(1)).kind == "classified"
    failed = make_result(1, outcome="failed", stage="acquire", reason="focus")
    assert (outcome_of(failed).kind, outcome_of(failed).stage) == ("failed", "acquire")
    assert outcome_of(make_result(1, outcome="cancelled", reason="cmd/cancel")).review is True
    stated = outcome_of(make_result(1, outcome="abstained", reason="no_usable_field"))
    assert (stated.kind, stated.reason) == ("abstained", "no_usable_field")
    with pytest.raises(ValueError, match="unknown kind"):
        outcome_of(make_result(1, outcome="exploded"))


def test_bad_database_urls_are_one_clear_error(tmp_path: Any) -> None:
    with pytest.raises(ArchiveError, match="in-memory"):
        open_engine("sqlite://")
    with pytest.raises(ArchiveError, match="not supported"):
        open_engine("mysql://x@localhost/db")
