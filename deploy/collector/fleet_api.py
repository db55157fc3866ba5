"""``/api/fleet/...``: rollouts and device groups, read-only (``omis fleet`` writes them).

No ``from __future__ import annotations``: FastAPI must see the ``Depends`` objects of the
closure in the route annotations.
"""

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from sqlalchemy import Engine

from deploy.collector.api_models import problem
from deploy.exceptions import FleetError
from deploy.fleet.store import FleetStore


def fleet_router(engine: Engine, viewer: Any, page_limit: int) -> APIRouter:
    """The fleet routes; ``viewer`` is the API's authentication dependency."""
    router = APIRouter(prefix="/api/fleet", tags=["fleet"])
    store = FleetStore(engine)

    @router.get("/rollouts", summary="rollouts, newest first, with each device's wave and step")
    def list_rollouts(
        _who: Annotated[Any, viewer],
        limit: Annotated[int, Query(ge=1, le=page_limit)] = 20,
    ) -> list[dict[str, Any]]:
        return [r.as_json() for r in store.rollouts(limit)]

    @router.get(
        "/rollouts/{rollout_id}", summary="one rollout", responses=problem(404, "no such rollout")
    )
    def get_rollout(
        _who: Annotated[Any, viewer], rollout_id: Annotated[int, PathParam(ge=1, le=2**62)]
    ) -> dict[str, Any]:
        try:
            return store.rollout(rollout_id).as_json()
        except FleetError as exc:
            raise HTTPException(404, str(exc)) from None

    @router.get("/groups", summary="device groups and their devices")
    def list_groups(_who: Annotated[Any, viewer]) -> dict[str, list[str]]:
        return store.groups()

    return router
