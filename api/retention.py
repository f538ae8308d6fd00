"""Retention of the service's store: deleting a profile (refused while plans use it, or cascading), and pruning by
the size cap and age limit of `Settings` after each write.

A plan made from a stored profile records its id (`plans.profile_id`). `DELETE /v1/profiles/{id}` answers 409 while
such plans exist, naming how many; `?cascade=true` deletes them with the profile. Pruning deletes plans (nothing
refers to a plan) and only profiles no plan uses, oldest first, and never what the triggering request just wrote.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from api.errors import ApiError
from api.storage import Storage

if TYPE_CHECKING:
    from api.service import ServiceContext

log = logging.getLogger(__name__)


def delete_profile(pid: str, storage: Storage, *, cascade: bool) -> int:
    """Forget a stored profile; 404 if there is none, 409 if plans use it and `cascade` is off. The number of plans
    deleted with it."""
    found, plans = storage.delete_profile(pid, cascade=cascade)
    if not found:
        raise ApiError(404, "not_found", f"no profile has id '{pid}'", "profile_id")
    if plans < 0:
        raise ApiError(409, "profile_in_use", f"{-plans} stored plan(s) were made from profile '{pid}'; delete them "
                       "first, or repeat with ?cascade=true to delete the profile and those plans", "profile_id")
    return plans


def apply_retention(ctx: ServiceContext, keep: tuple[str, ...]) -> None:
    """Prune by the settings' size cap and age limit after a write (`keep`: what was just written)."""
    settings = ctx.settings
    if settings.max_stored_bytes is None and settings.retention_days is None:
        return
    max_age = settings.retention_days * 86400 if settings.retention_days is not None else None
    pruned = ctx.storage.prune(max_bytes=settings.max_stored_bytes, max_age_s=max_age, keep=keep)
    if pruned.plans or pruned.profiles:
        log.info("retention: deleted %d plans and %d profiles", pruned.plans, pruned.profiles)
