"""The FastAPI application: ``create_app`` builds it from settings; ``app`` is what uvicorn serves."""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI

from app.api.main import api_router, health_router
from app.core.config import Settings, get_settings
from app.errors import install_error_handlers
from app.limits import BodyLimitMiddleware
from app.openapi import install_openapi
from app.queue import Enqueue, celery_enqueue, make_celery
from app.storage import make_storage
from app.store import JobStore


def create_app(settings: Settings | None = None, *, enqueue: Enqueue | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    app = FastAPI(
        title="DiffuseExpand",
        summary="On-demand expansion of 2D image/mask segmentation datasets with guided diffusion.",
        version="0.1.0",
    )
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    if enqueue is None:
        enqueue = celery_enqueue(make_celery(settings))
    app.state.settings = settings
    app.state.store = JobStore(r, make_storage(settings), settings, enqueue)
    app.include_router(health_router)
    app.include_router(api_router, prefix=settings.api_v1_str)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_openapi(app, settings)
    return app


app = create_app()
