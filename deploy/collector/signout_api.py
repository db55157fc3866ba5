"""``POST /api/results/{message_id}/review``: a person's verdict (sign-out) on a result.

The smallest form the data loop needs (the review branch brings the full one: sessions, CSRF,
audit, worklist); the table and body are the agreed ones (docs/collector.md).  Each POST is a
new ``reviews`` row; a later one amends (``supersedes`` the previous row of that result).
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Engine, func, insert, select

from deploy.collector.auth import Principal
from deploy.collector.bethesda import Bethesda
from deploy.collector.queries import rfc3339
from deploy.collector.store import utcnow
from deploy.collector.tables import results, reviews

SIGN_OUT_ROLES = frozenset({"operator", "cytotech", "pathologist", "admin"})


class ReviewIn(BaseModel):
    """The verdict."""

    model_config = ConfigDict(extra="forbid")

    bethesda: Bethesda
    adequacy: Literal["satisfactory", "unsatisfactory"] = "satisfactory"
    comment: str = Field("", max_length=4000)


def signout_router(writer: Engine, viewer: Any) -> APIRouter:
    """The router; writes go through ``writer``."""
    router = APIRouter()

    @router.post("/api/results/{message_id}/review", summary="sign out (or amend) a result")
    def post_review(
        who: Annotated[Principal, viewer], message_id: str, body: ReviewIn
    ) -> dict[str, Any]:
        if who.role not in SIGN_OUT_ROLES:
            raise HTTPException(403, f"role {who.role!r} may not sign out results")
        now = utcnow()
        with writer.begin() as conn:
            slide = conn.execute(
                select(results.c.slide_id).where(results.c.message_id == message_id)
            ).scalar_one_or_none()
            if slide is None:
                raise HTTPException(404, f"no result {message_id!r}")
            previous = conn.execute(
                select(func.max(reviews.c.id)).where(reviews.c.message_id == message_id)
            ).scalar_one_or_none()
            new_id = conn.execute(
                insert(reviews)
                .values(
                    message_id=message_id, slide_id=slide, bethesda=body.bethesda,
                    adequacy=body.adequacy, comment=body.comment, user_name=who.name,
                    role=who.role, created_at=now, supersedes=previous,
                )
                .returning(reviews.c.id)
            ).scalar_one()  # fmt: skip
        return {
            "id": int(new_id),
            "message_id": message_id,
            "slide_id": slide,
            **body.model_dump(),
            "user_name": who.name,
            "created_at": rfc3339(now),
            "supersedes": previous,
        }

    return router
