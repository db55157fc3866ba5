"""The real :class:`~deploy.appliance.base.SlideScanner`: microscope bridge + device pipeline.

``open()`` opens the backends and the model (:class:`deploy.serving.ModelServer`: the spectrum
backend once, the inference backend once per model, golden-gated), then the microscope URL.
Without an explicit bundle the scanner serves the model store's active model and follows it at
every slide boundary, so each result names exactly the model that produced it; for OTA it loads
a new model *beside* the serving one (:meth:`prepare_model`) and swaps it in between slides
(:meth:`load_model`).

``scan()`` acquires the request's fields along its plan (a named field layout of
``scan.plans``, recorded in the result's ``recipe``), checking the cancel flag between fields,
and runs :class:`inference.pipeline.SlidePipeline` on them.  With ``sim://`` each request puts
the simulated slide named by its slide id under the objective
(:func:`firmware_bridge.sim.slides.slide_by_id`, the mapping every entry point uses) and the
result carries ``simulation.pap_group``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pydantic import ValidationError

from deploy.appliance.base import ScannerInfo, ScanRequest, ShadowOutcome, SlideListener
from deploy.config import InferenceConfig, PlanConfig
from deploy.exceptions import InvalidResultError, ScanCancelledError, ScanError
from deploy.serving import ModelServer, Served, active_bundle_path
from firmware_bridge.validation import first_error
from inference.bundle import Bundle, Manifest
from inference.exceptions import InferenceError
from inference.pipeline import NoUsableFieldError, SlideResult
from inference.result import Simulation, SlideReport, field_reports, no_usable_field

if TYPE_CHECKING:
    from firmware_bridge.acquisition import ScanPlan
    from firmware_bridge.microscope_base import Microscope

log = logging.getLogger(__name__)

__all__ = ["MicroscopeScanner", "active_bundle_path", "resolve_bundle", "sim_seed"]

SIM_SIZE = (320, 256)  # small frames keep the simulated appliance fast on CPU-only machines


def sim_seed(url: str) -> int:
    """The ``seed`` of a ``sim://`` URL (0 by default)."""
    values = parse_qs(urlsplit(url).query).get("seed", ["0"])
    return int(values[0]) if values[0].isdigit() else 0


class MicroscopeScanner:
    """Microscope + inference pipeline behind the scanner seam.

    ``bundle_path=None`` serves (and follows) the model store of ``state_dir``; a path pins that
    bundle for this run (``--bundle``).  ``scan``, ``load_model`` and ``close`` are called by
    one thread at a time (the service's slide lock); ``prepare_model`` may run beside a scan.
    """

    def __init__(
        self,
        microscope_url: str,
        bundle_path: Path | None,
        state_dir: Path,
        *,
        inference: InferenceConfig | None = None,
        sim_size: tuple[int, int] = SIM_SIZE,
        plans: Mapping[str, PlanConfig] | None = None,
        allow_no_model: bool = False,
        min_usable_fields: int = 1,
    ) -> None:
        self.microscope_url = microscope_url
        self.sim_size = sim_size
        self.plans = dict(plans or {"default": PlanConfig()})
        self.models = ModelServer(
            bundle_path,
            state_dir,
            inference or InferenceConfig(),
            allow_empty=allow_no_model,
            min_usable_fields=min_usable_fields,
        )
        self._microscope: Microscope | None = None
        self._models_open = False
        self._listener: SlideListener | None = None
        # Our own load_slide must not trigger a scan.  The firmware's "slide inserted" event
        # arrives later on the reader thread, so count the inserts we caused and swallow as
        # many events (a time window around load_slide would let them through).
        self._own_inserts = 0
        self._own_inserts_lock = threading.Lock()
        self._shadow_due: tuple[Served, Served, SlideResult, str] | None = None

    @property
    def simulated(self) -> bool:
        """True for ``sim://`` microscopes."""
        return self.microscope_url.startswith("sim://")

    @property
    def follows_store(self) -> bool:
        """True when the model comes from the model store (no pinned ``--bundle``)."""
        return self.models.follows_store

    @property
    def model(self) -> dict[str, Any] | None:
        """Name, version and sha256 of the model serving now."""
        return self.models.describe()[0]

    def open(self) -> ScannerInfo:
        """Open the backends and the model, then the microscope."""
        from firmware_bridge.microscope import open_microscope

        if not self._models_open:  # a retry after a missing microscope keeps the open model
            self.models.open()
            self._models_open = True
        size = self.sim_size if self.simulated else None
        self._microscope = open_microscope(self.microscope_url, size=size)
        controller = getattr(self._microscope, "controller", None)
        if controller is not None:
            controller.add_event_listener(self._on_event)
        return self.info()

    def info(self) -> ScannerInfo:
        """What serves now: model, engine, firmware."""
        described = self._microscope.describe() if self._microscope is not None else {}
        model, engine = self.models.describe()
        return ScannerInfo(model=model, engine=engine, firmware=described.get("firmware"))

    # -- model switching (OTA) ---------------------------------------------------------------

    def prepare_model(self, bundle: Bundle) -> None:
        """Load ``bundle`` beside the serving model and pass its golden gate; keep it ready.

        Raises :class:`~inference.exceptions.InferenceError` when it does not pass.
        """
        self.models.prepare(bundle)

    def discard_prepared(self) -> None:
        """Drop a prepared model that will not be switched to (idempotent)."""
        self.models.discard_prepared()

    def check_shadow(self, manifest: Manifest) -> None:
        """Refuse a shadow candidate whose spectrum parameters differ from the serving ones."""
        self.models.check_same_spectrum(manifest)

    def prepare_shadow(self, bundle: Bundle) -> None:
        """Gate a shadow candidate: same spectrum, then the normal golden gate."""
        self.models.prepare_shadow(bundle)

    def unload_model(self) -> ScannerInfo:
        """Serve no model any more (a rolled-back first model); slide lock held."""
        self.models.unload()
        return self.info()

    def load_model(self, bundle: Bundle, generation: int | None) -> ScannerInfo:
        """Serve ``bundle`` from the next slide on; call between slides (slide lock held)."""
        self.models.switch(bundle, generation)
        return self.info()

    # -- slides ------------------------------------------------------------------------------

    def set_slide_listener(self, listener: SlideListener | None) -> None:
        """Call ``listener(slide_id)`` on the firmware's "slide inserted" event."""
        self._listener = listener

    def _on_event(self, event: Any) -> None:
        if event.kind != "slide_inserted" or self._listener is None:
            return
        with self._own_inserts_lock:
            if self._own_inserts > 0:
                self._own_inserts -= 1
                return
        described = self._microscope.describe() if self._microscope else {}
        slide_id = (described.get("simulation") or {}).get("slide_id")
        self._listener(str(slide_id or f"slide-{int(event.received_at)}"))

    def _load_sim_slide(self, microscope: Any, slide_id: str) -> None:
        from firmware_bridge.sim.slides import slide_by_id

        slide = slide_by_id(slide_id, sim_seed(self.microscope_url))
        with self._own_inserts_lock:
            self._own_inserts += 1
        try:
            microscope.load_slide(slide)
        except BaseException:
            with self._own_inserts_lock:
                self._own_inserts -= 1
            raise

    def plan_for(self, request: ScanRequest) -> ScanPlan:
        """The field layout of ``request``: its named plan, with the request's field count
        unless the plan fixes one."""
        layout = self.plans.get(request.plan)
        if layout is None:
            raise ScanError(f"unknown plan {request.plan!r} (known: {', '.join(self.plans)})")
        if self._microscope is None:
            raise ScanError("scanner is not open")
        base = self._microscope.default_plan(layout.fields or request.fields, layout.pattern)
        return base.model_copy(update={"step_um": layout.step_um, "columns": layout.columns})

    def _fields(
        self, microscope: Microscope, plan: ScanPlan, request: ScanRequest, cancel: threading.Event
    ) -> Iterator[Any]:
        for pair in microscope.acquire_fields(plan):
            if cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled")
            yield pair

    def scan(self, request: ScanRequest, cancel: threading.Event) -> SlideReport:
        """Acquire and classify one slide with the model serving when it starts."""
        microscope = self._microscope
        if microscope is None:
            raise ScanError("scanner is not open")
        self._shadow_due = None
        try:
            self.models.follow_store()
        except InferenceError as exc:
            raise ScanError(f"the store's new model could not be loaded: {exc}") from exc
        self.models.follow_shadow()
        served = self.models.served
        if served is None:
            raise ScanError("no model installed yet")
        plan = self.plan_for(request)
        if self.simulated:
            self._load_sim_slide(microscope, request.slide_id)
        try:
            result = served.pipeline.run_slide(self._fields(microscope, plan, request, cancel))
        except NoUsableFieldError as exc:
            if cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled") from exc
            # Nothing to classify, but the slide was scanned: publish a result that says so and
            # flags the slide for review, rather than leaving the dashboard without one.
            log.warning("slide %s: %s; published for review", request.slide_id, exc)
            report = self._unusable(served, exc)
        except ValidationError as exc:  # NaN or out-of-range outputs: never a call
            raise InvalidResultError(f"slide {request.slide_id}: {first_error(exc)}") from exc
        else:
            if cancel.is_set():
                raise ScanCancelledError(f"scan {request.scan_id} cancelled")
            try:
                report = result.report()
            except ValidationError as exc:  # NaN or out-of-range outputs: never a label
                raise InvalidResultError(f"slide {request.slide_id}: {first_error(exc)}") from exc
            # Run later (take_shadow, after the serving result is committed): the candidate can
            # neither change nor delay the serving result.
            shadow = self.models.shadow
            if shadow is not None:
                self._shadow_due = (shadow, served, result, request.slide_id)
        return self._with_context(microscope, report, request.plan, plan)

    def _run_shadow(
        self, shadow: Served, served: Served, result: SlideResult, slide: str
    ) -> ShadowOutcome:
        """The shadow candidate's call on this slide's spectrum (no second acquisition)."""
        candidate = dict(shadow.bundle.describe())
        if shadow.pipeline.params != served.pipeline.params:
            why = "the serving model's spectrum parameters changed; the shadow cannot run on them"
            self.models.shadow_error = why
            return ShadowOutcome(candidate, None, why)
        try:
            call = shadow.pipeline.classify_slide_spectrum(result.spectrum, result.fields)
            report = call.report()
        except (InferenceError, ValidationError, ValueError) as exc:
            log.error("slide %s: shadow candidate failed: %s", slide, exc)
            return ShadowOutcome(candidate, None, f"{type(exc).__name__}: {exc}"[:512])
        return ShadowOutcome(candidate, report)

    def take_shadow(self) -> ShadowOutcome | None:
        """The shadow candidate's call on the last scanned slide (once), or None.

        Computed here, from the slide's spectrum kept by :meth:`scan`; the scan worker calls
        it after the serving result is committed and before the next slide starts.
        """
        due, self._shadow_due = self._shadow_due, None
        return None if due is None else self._run_shadow(*due)

    @staticmethod
    def _unusable(served: Served, exc: NoUsableFieldError) -> SlideReport:
        return no_usable_field(
            served.bundle.describe(),
            served.backend.describe(),
            served.pipeline.params.algorithm,
            field_reports(exc.fields),
            exc.timings_ms,
        )

    @staticmethod
    def _with_context(
        microscope: Microscope, report: SlideReport, name: str, plan: ScanPlan
    ) -> SlideReport:
        described = microscope.describe()
        sim = described.get("simulation")
        simulation = None
        if sim is not None:
            simulation = Simulation(pap_group=sim["pap_group"], slide_seed=sim.get("slide_seed"))
        recipe = {"plan": {"name": name, **plan.model_dump(mode="json")}}
        return report.with_context(described.get("firmware"), simulation, recipe)

    def close(self) -> None:
        """Close the microscope and the backends (idempotent)."""
        microscope, self._microscope = self._microscope, None
        try:
            if microscope is not None:
                microscope.close()
        finally:
            self._models_open = False
            self.models.close()


def resolve_bundle(bundle: str | Path | None, state_dir: Path) -> Path:
    """``--bundle`` if given, else the active model of the state dir's model store."""
    return Path(bundle) if bundle else active_bundle_path(state_dir)
