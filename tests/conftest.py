"""Shared test set-up: GPU-marked tests run only where pycuda and a CUDA GPU are usable."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

GPU_SKIP_REASON = "no usable CUDA GPU / pycuda"


@functools.cache
def cuda_gpu_usable() -> bool:
    """True when pycuda imports and the CUDA driver sees at least one GPU."""
    try:
        import pycuda.driver as cuda
    except ImportError:
        return False
    try:
        cuda.init()
        return int(cuda.Device.count()) > 0
    except cuda.Error:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip (report as not run) every ``@pytest.mark.gpu`` test where no GPU is usable."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or cuda_gpu_usable():
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in gpu_items:
        item.add_marker(skip)


# -- the dashboard's browser: one Chromium per test module, a fresh context per test ----------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (no browser download), shared by a module."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    """A page in a fresh context (own cookies and storage), Europe/Berlin time; it fails the
    test on any JavaScript error or Content-Security-Policy violation."""
    context = chromium.new_context(
        ignore_https_errors=True,  # the broker's certificate comes from the test CA
        viewport={"width": 1180, "height": 1000},
        timezone_id="Europe/Berlin",
        accept_downloads=True,
    )
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: errors.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    yield page
    context.close()
    assert errors == [], f"JavaScript errors on the page: {errors}"
