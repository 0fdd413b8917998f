"""The OpenAPI document: an example for every request body and every error, and no error code
raised in the code without its documented example."""

from __future__ import annotations

import re

import pytest

from api.problems import EXAMPLES, MEDIA_TYPE, ProblemDetails

from conftest import ROOT


@pytest.fixture(scope="module")
def openapi(redis_server) -> dict:
    from api.main import create_app

    from conftest import settings_for

    return create_app(settings_for(redis_server)).openapi()


def operations(openapi: dict):
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            yield f"{method.upper()} {path}", operation


def resolve(openapi: dict, schema: dict) -> dict:
    """The schema a `$ref` (or an optional body's `anyOf: [$ref, null]`) points at."""
    ref = schema.get("$ref") or next((s["$ref"] for s in schema.get("anyOf", []) if "$ref" in s), None)
    return openapi["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def test_every_request_body_has_an_example(openapi):
    bodies = [
        (name, op["requestBody"]["content"]["application/json"])
        for name, op in operations(openapi)
        if "requestBody" in op
    ]

    assert len(bodies) == 13  # native submit, predict, backtest, anomalies, finetunes, /predict, /predict/batch;
    # three compat routes twice
    for name, media in bodies:
        assert media.get("examples") or resolve(openapi, media["schema"]).get("examples"), name


def test_routes_that_read_the_key_and_headers_by_hand_document_them_as_declared_ones(openapi):
    """The hot routes take no FastAPI dependencies (api/deps.py); `read_by_hand` documents what they
    read as FastAPI documents `Caller` and a declared header on the other routes."""
    paths = openapi["paths"]
    declared = paths["/v1/backtests"]["post"]  # Caller and IdempotencyKey, declared
    public = {"GET /healthz", "GET /readyz", "GET /metrics", "GET /health", "GET /models/{slug}/health"}

    for name, operation in operations(openapi):
        if name not in public:
            assert operation.get("security") == declared["security"], name
    for hot in ("/v1/forecasts", "/v1/predict", "/predict", "/predict/batch"):
        parameters = {p["name"]: p for p in paths[hot]["post"]["parameters"]}
        assert parameters["Idempotency-Key"] == next(p for p in declared["parameters"] if p["name"] == "Idempotency-Key")
    prefer = next(p for p in paths["/v1/forecasts"]["post"]["parameters"] if p["name"] == "Prefer")
    assert prefer["in"] == "header" and prefer["schema"]["anyOf"][0] == {"type": "string", "maxLength": 255}
    assert {p["name"] for p in paths["/v1/forecasts/{job_id}"]["get"]["parameters"]} == {"job_id", "wait"}
    assert set(openapi["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}


def test_every_error_response_is_problem_json_with_matching_examples(openapi):
    errors = [(name, int(status), response) for name, op in operations(openapi)
              for status, response in op["responses"].items() if int(status) >= 400]  # fmt: skip

    assert len(errors) >= 60
    for name, status, response in errors:
        assert list(response["content"]) == [MEDIA_TYPE], f"{name} {status}"
        examples = response["content"][MEDIA_TYPE]["examples"]
        assert examples, f"{name} {status}"
        for example in examples.values():
            problem = ProblemDetails.model_validate(example["value"])
            assert problem.status == status and problem.type.endswith(problem.code), f"{name} {status}"


def test_every_problem_code_the_api_raises_has_a_documented_example():
    source = "\n".join(p.read_text() for p in (ROOT / "api").rglob("*.py"))
    raised = set(re.findall(r'Problem\(\s*(\d{3}),\s*"([a-z-]+)"', source))

    assert len(raised) >= 15
    for status, code in raised:
        assert code in EXAMPLES and EXAMPLES[code][0] == int(status), code
