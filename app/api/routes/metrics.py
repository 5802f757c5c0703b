import hmac

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from app.api.deps import SettingsDep
from app.errors import problem_responses
from app.metrics import METRICS_PATH

router = APIRouter(tags=["metrics"])

_EXPOSITION = {"schema": {"type": "string"}}


def _check_key(request: Request, expected: str) -> None:
    """``Authorization: Bearer DIFFEXP_METRICS_KEY``. Read by hand rather than declared as a security
    scheme: the key is optional, and a scheme in the document would claim every scrape needs one."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(
            status_code=401,
            detail="missing bearer key: send 'Authorization: Bearer DIFFEXP_METRICS_KEY'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(
            status_code=401,
            detail="invalid metrics key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


@router.get(
    METRICS_PATH,
    response_class=Response,  # its own Content-Type: text or OpenMetrics, as the scraper asks
    responses={
        200: {
            "description": "Prometheus text format (OpenMetrics when the Accept header asks for it)",
            "content": {"text/plain": _EXPOSITION, "application/openmetrics-text": _EXPOSITION},
        },
        **problem_responses(401),
    },
)
def read_metrics(request: Request, settings: SettingsDep) -> Response:
    """Metrics for Prometheus: HTTP requests of this API process, and the service's jobs, queues,
    workers, pairs and shards (from Redis; ``diffexp_redis_up 0`` when Redis cannot be read).

    Open by default, like the health probes; with ``DIFFEXP_METRICS_KEY`` set it needs
    ``Authorization: Bearer`` that key (401 otherwise). docs/metrics.md lists every metric.
    """
    if settings.metrics_key is not None:
        _check_key(request, settings.metrics_key.get_secret_value())
    registry: CollectorRegistry = request.app.state.metrics_registry
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type})
