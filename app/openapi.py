"""The OpenAPI document as the running service enforces it.

FastAPI derives the document from the routes; two things it cannot know are added here:
error responses are ``application/problem+json`` (``app.errors.Problem``), not ``application/json``;
and the bounds that depend on settings or on the bundles present (``count`` ≤ DIFFEXP_MAX_COUNT,
``steps`` ≤ DIFFEXP_MAX_STEPS, ``max_attempts`` ≤ factor x max count, ``model`` one of the bundles)
are written into the ``JobCreate`` schema, so a client (or a fuzzer) reading the document knows
which requests are valid. ``max_attempts ≥ count`` relates two fields and stays in the description.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from fastapi import FastAPI

from app.core.config import Settings
from app.errors import PROBLEM_JSON

REF = "#/components/schemas/"
ADMIN_VIEW = "-"  # a viewer that owns nothing: sees the admin's (shared) models only
_ERROR_SCHEMAS = (REF + "Problem", REF + "HTTPValidationError")


def _can_fail_validation(operation: dict[str, Any]) -> bool:
    """A body, or a parameter outside the path: the only path parameters here are string ids, which
    FastAPI never refuses (an id of the wrong format is a 404)."""
    return "requestBody" in operation or any(p.get("in") != "path" for p in operation.get("parameters", []))


def _problem_content(doc: dict[str, Any]) -> None:
    """Every error response documented as ``application/json`` becomes a problem+json ``Problem``;
    the 422 FastAPI adds to every operation with parameters is dropped where none can fail."""
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            auto = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
            if auto.get("$ref") == REF + "HTTPValidationError" and not _can_fail_validation(operation):
                del responses["422"]
            for response in responses.values():
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref") in _ERROR_SCHEMAS:
                    response["content"] = {PROBLEM_JSON: {"schema": {"$ref": REF + "Problem"}}}
    schemas = doc.get("components", {}).get("schemas", {})
    text = json.dumps(doc.get("paths", {}))
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f'{REF}{unused}"' not in text:
            del schemas[unused]


def _parameters_never_null(doc: dict[str, Any]) -> None:
    """A query parameter or header is a string or absent, never JSON ``null``: an optional one
    (``int | None``) is documented as its non-null branch and ``required: false``, so that
    ``Last-Event-ID: null`` reads as what it gets, a malformed value (422)."""
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            for param in operation.get("parameters", []):
                schema = param.get("schema", {})
                options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
                if "anyOf" in schema and len(options) == 1 and len(options) < len(schema["anyOf"]):
                    rest = {k: v for k, v in schema.items() if k != "anyOf"}
                    if rest.get("default", 0) is None:
                        del rest["default"]
                    param["schema"] = {**options[0], **rest}


def _branch(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ``kind`` branch of an optional property (``anyOf: [{type: kind}, {type: null}]``)."""
    for option in prop.get("anyOf", []):
        if option.get("type") == kind:
            return option
    return prop


def _settings_bounds(doc: dict[str, Any], settings: Settings) -> None:
    props = doc["components"]["schemas"]["JobCreate"]["properties"]
    props["count"]["maximum"] = settings.max_count
    steps = _branch(props["steps"], "integer")
    steps["maximum"] = min(steps.get("maximum", settings.max_steps), settings.max_steps)
    _branch(props["max_attempts"], "integer")["maximum"] = settings.max_attempts_factor * settings.max_count
    training = doc["components"]["schemas"]["TrainingCreate"]["properties"]
    for field in ("train_steps", "segmenter_steps", "filter_steps"):  # DIFFEXP_TRAIN_MAX_STEPS
        _branch(training[field], "integer")["maximum"] = settings.train_max_steps


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve the adjusted document at ``/openapi.json`` (the bundles are listed anew each time)."""
    base: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not base:
            doc = copy.deepcopy(FastAPI.openapi(app))
            _problem_content(doc)
            _parameters_never_null(doc)
            _settings_bounds(doc, settings)
            base.update(doc)
        doc = copy.deepcopy(base)
        # The shared models as examples, not an enum: a key's own models (not in this public document)
        # and NAME@VERSION are valid too, and a client validating against an enum would refuse them.
        try:
            bundles = [m["name"] for m in app.state.registry.list_models(ADMIN_VIEW)]
        except Exception:  # Redis or storage down: the document (and /docs) is still served
            bundles = []
        if bundles:
            model = _branch(doc["components"]["schemas"]["JobCreate"]["properties"]["model"], "string")
            model["examples"] = bundles
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


def upload_body(file_description: str, **fields: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of an upload route: a multipart form with ``file`` (an archive) and
    ``fields``. Declared by hand: those routes read the form themselves, after the key is checked."""
    file = {"type": "string", "contentMediaType": "application/octet-stream", "description": file_description}
    schema = {
        "type": "object",
        "required": ["file"],
        "additionalProperties": False,
        "properties": {"file": file, **fields},
    }
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
