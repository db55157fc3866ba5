"""Scan plans are honoured and recorded; a slide id is the same simulated slide everywhere."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from broker_support import FakeScanner
from fakes.bundles import make_bundle

from deploy.appliance.base import ScanRequest
from deploy.appliance.service import Appliance
from deploy.config import PlanConfig, load_config
from deploy.scanner import MicroscopeScanner
from firmware_bridge.microscope import open_microscope
from firmware_bridge.sim.slides import slide_by_id

SIZE = (64, 48)


@pytest.fixture
def scanner(tmp_path: Path) -> MicroscopeScanner:
    bundle = make_bundle(tmp_path / "bundle", seed=1, version=1)
    plans = {
        "default": PlanConfig(),
        "wide": PlanConfig(pattern="grid", fields=2, step_um=(1500.0, 1500.0), columns=2),
    }
    s = MicroscopeScanner(
        "sim://?seed=4", bundle.root, tmp_path / "state", sim_size=SIZE, plans=plans
    )
    s.open()
    yield s
    s.close()


@pytest.mark.parametrize("slide_id", ["abc", "S-2041", "sim4-0007", "sim9-0007"])
def test_every_entry_point_maps_a_slide_id_to_the_same_simulated_slide(
    scanner: MicroscopeScanner, slide_id: str
) -> None:
    with open_microscope(f"sim://?seed=4&slide={slide_id}", size=SIZE) as scope:
        by_url = scope.describe()["simulation"]
    report = scanner.scan(ScanRequest(slide_id, 1), threading.Event())
    expected = slide_by_id(slide_id, 4)
    assert report.simulation is not None
    assert (by_url["pap_group"], by_url["slide_seed"]) == (expected.pap_group, expected.seed)
    assert (report.simulation.pap_group, report.simulation.slide_seed) == (
        expected.pap_group,
        expected.seed,
    )


def test_a_named_plan_sets_the_field_layout_and_is_recorded(scanner: MicroscopeScanner) -> None:
    report = scanner.scan(ScanRequest("sim4-0001", 5, plan="wide"), threading.Event())
    assert len(report.fields) == 2  # the plan's count wins over the request's
    assert report.recipe is not None
    plan = report.recipe.plan
    assert (plan.name, plan.pattern, plan.fields, plan.columns) == ("wide", "grid", 2, 2)
    assert plan.step_um == (1500.0, 1500.0)
    default = scanner.scan(ScanRequest("sim4-0001", 3), threading.Event())
    assert default.recipe is not None and default.recipe.plan.name == "default"
    assert default.recipe.plan.fields == 3 and len(default.fields) == 3


def test_an_unknown_plan_is_refused_at_the_door(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"device": {"id": "p1"}})
    app = Appliance(config, tmp_path / "state", FakeScanner())
    reply = app.router.handle("scan", b'{"slide_id": "S-1", "plan": "nope"}', b"c")
    assert reply is not None and reply["ok"] is False
    assert reply["error"]["code"] == "invalid" and "nope" in reply["error"]["message"]
    assert app.queue.depth == 0


def test_the_configured_plan_must_exist() -> None:
    from deploy.exceptions import ConfigError

    with pytest.raises(ConfigError, match=r"plan 'wide' is not in scan\.plans"):
        load_config(environ={}, overrides={"scan": {"plan": "wide"}})


def test_non_finite_model_outputs_end_in_a_failed_infer_result(
    scanner: MicroscopeScanner,
) -> None:
    import numpy as np

    from deploy.appliance.publisher import MemoryPublisher
    from deploy.appliance.queue import ScanQueue
    from deploy.appliance.results import Identity
    from deploy.appliance.worker import ScanPorts, ScanWorker
    from deploy.schemas import validate

    served = scanner.models.served
    assert served is not None
    served.backend.infer = lambda tensor: np.full((1, 2), np.nan, np.float32)  # type: ignore[method-assign]
    verdicts: list[str] = []
    publisher = MemoryPublisher()
    ports = ScanPorts(
        publisher=publisher,
        has_room=lambda: True,
        slide_started=lambda: 1,
        slide_finished=lambda token, verdict, why: verdicts.append(verdict),
        status_changed=lambda: None,
        record_error=lambda code, msg: None,
        info=scanner.info,
        model_seen=lambda model: None,
    )
    worker = ScanWorker(Identity("d1", "b"), scanner, ScanQueue(2), ports)
    worker.scan_one(ScanRequest("sim4-0001", 1))
    (result,) = publisher.results
    data = result.to_json()
    validate("result", data)
    assert (data["outcome"], data["stage"], data["prediction"]["label"]) == (
        "failed",
        "infer",
        None,
    )
    assert "finite" in data["reason"] or "nan" in data["reason"].lower()
    assert verdicts == ["failed"]  # it counts against a model on probation
