"""``GET /api/shadow``: how a shadow candidate compares with the serving model (read-only).

No ``from __future__ import annotations``: FastAPI must see the ``Depends`` objects of the
closure in the route annotations.
"""

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from sqlalchemy import Engine

from deploy.collector.http_params import DeviceFilter
from deploy.collector.shadow import ShadowArchive

# ASCII classes only: OpenAPI clients read the pattern as ECMA-262, where \s and \d differ.
CANDIDATE = r"^([0-9a-f]{64}|[^:\x00-\x20\x7f]{1,128}:[0-9]{1,18})$"


def shadow_router(engine: Engine, viewer: Any) -> APIRouter:
    """The shadow comparison route; ``viewer`` is the API's authentication dependency."""
    router = APIRouter(prefix="/api", tags=["shadow"])
    archive = ShadowArchive(engine)

    @router.get(
        "/shadow",
        summary="a shadow candidate against serving: agreement, referral, reviewed performance",
    )
    def get_shadow(
        _who: Annotated[Any, viewer],
        candidate: Annotated[
            str,
            Query(
                pattern=CANDIDATE,
                max_length=160,
                description="the candidate's model sha256, or name:version",
            ),
        ],
        device: DeviceFilter = None,
    ) -> dict[str, Any]:
        try:
            return archive.compare(candidate, [device] if device else None)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    return router
