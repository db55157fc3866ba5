"""``omis demo --loop``, shrunk: scan, sign out through the API, export, train, validate."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from deploy.broker import find_mosquitto
from deploy.demo import DemoConfig
from deploy.demo_loop import loop_config, run_loop


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_loop_runs_end_to_end(tmp_path: Path) -> None:
    demo = DemoConfig(
        cache_dir=tmp_path / "cache",
        fields=1,
        train_slides=30,
        train_fields=1,
        train_size="160x128",
        folds=2,
    )
    out = io.StringIO()
    cfg = loop_config(demo, round1=12, round2=6, folds=2, epochs=3)
    assert run_loop(cfg, Console(file=out, width=160)) == 0
    text = out.getvalue()
    assert "stand in for a cytotechnologist" in text.replace("\n", " ") or "stands in" in text
    assert "archived 12 results, signed out 12" in text
    assert "archived 6 results, signed out 6" in text
    assert "locked" in text
    assert "omis-demo-1d v1" in text and "omis-loop v2" in text  # both models' performance
    assert (tmp_path / "cache" / "loop" / "export-round2" / "export.json").is_file()
