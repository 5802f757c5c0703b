from fastapi import APIRouter, Depends

from app.api.deps import get_principal, known_query
from app.api.routes import datasets, events, health, jobs, keys, metrics, models, pairs, trainings
from app.errors import ErrorResponses

# Every /v1 route needs a key (Authorization: Bearer KEY), unless DIFFEXP_AUTH=off.
api_router = APIRouter(
    dependencies=[Depends(get_principal), Depends(known_query)], responses=ErrorResponses.AUTH
)
api_router.include_router(jobs.router)
api_router.include_router(events.router)
api_router.include_router(pairs.router)
api_router.include_router(models.router)
api_router.include_router(keys.router)
api_router.include_router(datasets.router)
api_router.include_router(trainings.router)
# health probes live at the root, outside the versioned prefix, and need no key
health_router = health.router
# /metrics too (Prometheus scrapes it): open, or protected by its own key (DIFFEXP_METRICS_KEY)
metrics_router = metrics.router
