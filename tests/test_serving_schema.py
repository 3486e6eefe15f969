"""The published OpenAPI schema is the server's behaviour: a bounded, deterministic schemathesis run
in-process against the ASGI app (tiny-llama on CPU).

For every operation, schema-valid requests (positive data) and schema-violating ones (negative
data) are generated from /openapi.json and sent to the app. Every response must be no 5xx, with a
declared status code, a declared content type and a body that matches the declared schema; most
positive requests must be accepted (2xx). Generation is kept cheap by capping ``max_tokens`` (and
``min_tokens`` under it) in the generated bodies, and by the schema itself, which states this
server's small limits (``n``, prompts per request, context length).
"""
from __future__ import annotations

from collections import Counter, defaultdict

import pytest

pytest.importorskip("fastapi", reason="kvlab serve's packages: the serve extra (make setup installs dev, which has it)")
schemathesis = pytest.importorskip("schemathesis", reason="OpenAPI schema testing: the dev extra (make setup)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402  (a BaseExceptionGroup)
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MODEL = "tiny"
MAX_MODEL_LEN = 512  # room for long generated prompts (4-byte characters are 4 tokens)
MAX_NEW_TOKENS = 4  # cap on generated max_tokens: generation stays cheap
POSITIVE_EXAMPLES = 50  # per operation
NEGATIVE_EXAMPLES = 20
MIN_ACCEPTED_SHARE = 0.8  # of positive requests to the POST routes
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = {("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
              ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")}


@pytest.fixture(scope="module")
def app():
    from engine import EngineConfig, LLMEngine
    from engine.async_engine import AsyncLLMEngine
    from engine.serving.app import create_app
    from engine.serving.limits import ServerLimits

    engine = AsyncLLMEngine(LLMEngine(EngineConfig(model="tiny-llama", device="cpu", max_model_len=MAX_MODEL_LEN,
                                                   kv_cache_tokens=16384, record_memory=False)))
    limits = ServerLimits(max_n=3, max_prompts_per_request=3, max_stop_strings=4, max_stop_string_chars=16)
    yield create_app(engine, MODEL, limits=limits)
    engine.shutdown()


def _integer(value) -> int | None:
    """The value of an integer field as JSON Schema counts integers (``4.0`` included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return None


def _cap(case) -> None:
    """Keep generation cheap: at most MAX_NEW_TOKENS new tokens, min_tokens no more than that (a
    relation JSON Schema cannot state). The body stays schema-valid."""
    body = case.body
    if not isinstance(body, dict):
        return
    keys = [k for k in ("max_tokens", "max_completion_tokens") if k in body]
    if case.path == "/v1/chat/completions" and not any(body.get(k) is not None for k in keys):
        body["max_completion_tokens"] = MAX_NEW_TOKENS
        keys.append("max_completion_tokens")
    for k in keys:
        if (_integer(body[k]) or 0) > MAX_NEW_TOKENS:
            body[k] = MAX_NEW_TOKENS
    min_tokens = _integer(body.get("min_tokens"))
    if min_tokens is not None:
        limits = [_integer(body[k]) for k in keys if _integer(body[k]) is not None]
        body["min_tokens"] = min([min_tokens, MAX_NEW_TOKENS, *limits])


def _run(operation, mode: GenerationMode, examples: int) -> tuple[Counter, list[str]]:
    statuses: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        if mode is GenerationMode.POSITIVE:
            _cap(case)
        response = case.call()
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (FailureGroup, Exception) as e:  # noqa: BLE001  (collected: one report of all of them)
            failures.append(f"{operation.method.upper()} {operation.path} {mode.value} {response.status_code}: "
                            f"{str(e)[:600]}\n  request body: {str(case.body)[:300]}")

    try:
        run()
    except Unsatisfiable:  # nothing in the operation can be made invalid (no body, no constrained parameter)
        assert mode is GenerationMode.NEGATIVE, operation.path
    return statuses, failures


def test_schemathesis_run_conforms_and_accepts_most_valid_requests(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} == OPERATIONS
    failures: list[str] = []
    positive: dict[str, Counter] = defaultdict(Counter)
    for op in operations:
        for mode, examples in ((GenerationMode.POSITIVE, POSITIVE_EXAMPLES),
                               (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES)):
            statuses, found = _run(op, mode, examples)
            failures += found
            if mode is GenerationMode.POSITIVE:
                positive[f"{op.method.upper()} {op.path}"] = statuses
    report = {name: dict(counts) for name, counts in positive.items()}
    print(f"\nschemathesis positive-data statuses per operation: {report}")
    assert not failures, "\n".join(failures[:20])
    posts = [c for name, c in positive.items() if name.startswith("POST")]
    sent = sum(sum(c.values()) for c in posts)
    accepted = sum(n for c in posts for status, n in c.items() if 200 <= status < 300)
    print(f"schemathesis: {accepted}/{sent} = {accepted / sent:.0%} of schema-valid POST requests accepted")
    assert sent >= 2 * 10 and accepted / sent >= MIN_ACCEPTED_SHARE, report
    for name in ("GET /health", "GET /metrics", "GET /v1/models"):
        assert set(positive[name]) == {200}, (name, positive[name])


def test_published_schema_declares_what_is_sent(app):
    from engine.serving.app import create_app

    doc = app.openapi()
    text = str(doc)
    assert "422" not in doc["paths"]["/v1/completions"]["post"]["responses"] and "HTTPValidationError" not in text
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)
            assert {"408", "413", "431"} <= set(op["responses"]), (method, path)
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "503"} <= set(responses) and "401" not in responses
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in ("400", "404", "408", "413", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert doc["paths"]["/health"]["get"]["responses"]["200"].get("content", {}) == {}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # limits.max_concurrency: a 503 with Retry-After on every route it counts (not /health, /metrics)
    for path, method in (("/v1/models", "get"), ("/v1/models/{model_id}", "get"), ("/v1/completions", "post")):
        busy = doc["paths"][path][method]["responses"]["503"]
        assert "max_concurrency" in busy["description"] and "Retry-After" in busy["headers"], path
    assert "not running" in doc["paths"]["/v1/completions"]["post"]["responses"]["503"]["description"]
    assert "503" not in doc["paths"]["/metrics"]["get"]["responses"]
    assert "max_concurrency" not in doc["paths"]["/health"]["get"]["responses"]["503"]["description"]
    request = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["n"]["anyOf"][0]["maximum"] == 3
    assert request["max_tokens"]["anyOf"][0]["maximum"] == MAX_MODEL_LEN - 1
    assert request["seed"]["anyOf"][0]["maximum"] == 2**63 - 1  # exact, not rounded through a float
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert chat["tools"]["type"] == "null" and "not supported" in chat["tools"]["description"].lower()
    keyed = create_app(app.state.engine, MODEL, api_key="k", limits=app.state.limits).openapi()
    op = keyed["paths"]["/v1/chat/completions"]["post"]
    assert "401" in op["responses"] and op["security"] == [{"bearer": []}]
    assert keyed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "security" not in keyed["paths"]["/health"]["get"]
