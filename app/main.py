"""The FastAPI application: ``create_app`` builds it from settings; ``app`` is what uvicorn serves."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api.main import api_router, health_router, metrics_router
from app.auth import KeyStore, Quotas
from app.authlimit import AuthFailureGuard, FailureLimiter
from app.core.config import Settings, get_settings, is_loopback
from app.datasets import DatasetStore
from app.decodes import DecodeSlots
from app.docs import install_docs
from app.errors import install_error_handlers
from app.limits import BodyLimitMiddleware
from app.metrics import install_metrics
from app.openapi import install_openapi
from app.page import install_page
from app.queue import Enqueue, celery_enqueue, celery_train_enqueue, make_celery
from app.reconciler import Reconciler
from app.registry import Registry
from app.storage import make_storage
from app.store import JobStore
from app.trainings import TrainEnqueue, TrainingStore
from app.webhooks import WebhookSender

log = logging.getLogger("diffexp.api")


class UnsafeConfig(RuntimeError):
    """Settings the API refuses to start with."""


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Enqueue | None = None,
    train_enqueue: TrainEnqueue | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level)
    if settings.auth == "off" and not is_loopback(settings.host):
        raise UnsafeConfig(
            f"DIFFEXP_AUTH=off on DIFFEXP_HOST={settings.host}: without keys the API may only listen on a "
            "loopback address (127.0.0.1, ::1, localhost); set DIFFEXP_AUTH=required and an admin key"
        )
    try:
        admin_key = settings.admin_key_value()
    except ValueError as exc:
        raise UnsafeConfig(str(exc)) from None
    if settings.auth == "required" and admin_key is None:
        log.warning(
            "no admin key (DIFFEXP_ADMIN_KEY or DIFFEXP_ADMIN_KEY_FILE): keys already stored work, "
            "but none can be created or revoked"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reconciler = Reconciler(
            app.state.store, trainings=app.state.trainings
        )  # also runs in every worker; one sweep per interval
        reconciler.start()
        webhooks = WebhookSender(app.state.store)  # the API sends webhooks: it is the one facing out
        webhooks.start()
        try:
            yield
        finally:
            webhooks.stop()
            reconciler.stop()

    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,  # served by app.docs, with local assets
        redoc_url=None,
        title="DiffuseExpand",
        summary="On-demand expansion of 2D image/mask segmentation datasets with guided diffusion.",
        version="0.1.0",
    )
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    celery = make_celery(settings)  # connects on first send only
    if enqueue is None:
        enqueue = celery_enqueue(celery)
    if train_enqueue is None:
        train_enqueue = celery_train_enqueue(celery)
    storage = make_storage(settings)
    app.state.settings = settings
    app.state.admin_key = admin_key
    app.state.store = JobStore(r, storage, settings, enqueue)
    app.state.keys = KeyStore(r, storage, settings.redis_prefix)
    app.state.datasets = DatasetStore(r, storage, settings.redis_prefix)
    app.state.decodes = DecodeSlots(settings.max_concurrent_decodes, settings.decode_wait_s)
    app.state.trainings = TrainingStore(r, storage, settings, app.state.datasets, train_enqueue)
    app.state.quotas = Quotas(r, settings.redis_prefix)
    app.state.registry = Registry(storage, r, settings)
    app.state.auth_limiter = FailureLimiter(settings.auth_fail_burst, settings.auth_fail_rate)
    if origins := settings.cors_origin_list():
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After"],
        )
    app.include_router(health_router)
    app.include_router(metrics_router)
    app.include_router(api_router, prefix=settings.api_v1_str)
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        uploads={f"{settings.api_v1_str}/datasets": settings.max_upload_mb << 20},
        upload_patterns={f"{settings.api_v1_str}/models/*/versions": settings.max_upload_mb << 20},
    )
    install_openapi(app, settings)
    install_docs(app)
    install_page(app)
    if settings.auth != "off":  # outside everything but the HTTP metrics: a refusal costs next to nothing
        app.add_middleware(
            AuthFailureGuard,
            limiter=app.state.auth_limiter,
            prefix=settings.api_v1_str,
            admin_key=admin_key,
            hold_s=settings.auth_fail_hold_s,
        )
    app.state.metrics_registry = install_metrics(app, settings)  # last: its middleware is the outermost
    return app


app = create_app()
