"""A client for the DiffuseExpand service (httpx only; no torch): ``from diffuseexpand import Client``."""

from diffuseexpand.client import VERSION, AsyncClient, Client
from diffuseexpand.errors import (
    Conflict,
    DiffuseExpandError,
    Forbidden,
    InvalidRequest,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    Unreachable,
    UnsafeArchive,
    WaitTimeout,
)
from diffuseexpand.types import Job, Model, Pair, PairsPage, Progress

__version__ = VERSION
__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "DiffuseExpandError",
    "Forbidden",
    "InvalidRequest",
    "Job",
    "JobFailed",
    "Model",
    "NotFound",
    "Pair",
    "PairsPage",
    "Progress",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsafeArchive",
    "Unreachable",
    "WaitTimeout",
]
