from fastapi import APIRouter

from app.api.routes import health, jobs, models

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(models.router)
# health probes live at the root, outside the versioned prefix
health_router = health.router
