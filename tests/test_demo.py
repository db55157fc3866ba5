"""``omis demo`` end to end, shrunk: synthesise, train (tiny), scan over a real broker, summary."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from deploy.broker import find_mosquitto
from deploy.demo import DemoConfig, run_demo


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed")
def test_demo_scans_publishes_and_summarises(tmp_path: Path) -> None:
    cfg = DemoConfig(
        cache_dir=tmp_path / "cache",
        slides=2,
        fields=1,
        train_slides=30,
        train_fields=1,
        train_size="160x128",
        folds=2,
    )
    out = io.StringIO()
    assert run_demo(cfg, Console(file=out, width=120)) == 0
    text = out.getvalue()
    assert "results delivered: 2 (duplicates recognised: 0)" in text
    assert "sim2026-0000" in text and "sim2026-0001" in text
    assert '"acknowledged": 2' in text
    assert "not clinical performance" in text
    assert "archived: 2 of 2; history: http://127.0.0.1:" in text  # omis collect ran beside
    # Second run: data and model come from the cache.
    out = io.StringIO()
    assert run_demo(cfg, Console(file=out, width=120)) == 0
    assert "dataset: cached" in out.getvalue() and "cached bundle" in out.getvalue()
    assert "archived: 2 of 2" in out.getvalue()  # the same archive file keeps both runs
