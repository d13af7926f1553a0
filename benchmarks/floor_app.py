"""Ray Serve apps that do no work: what Serve's request path alone costs on this machine.

`single`: one FastAPI deployment answering POST /v1/route at once (HTTP proxy → replica).
`shape`: TransferDesk's shape, each hop doing nothing: an Ingress that awaits a Tokenizer, a
Classifier and a Router in turn (three handle calls a request), as deployments/app.py does.
Run by `benchmarks/cpu_serving.py --floor`; nothing else imports it.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself, not a string.
from fastapi import FastAPI, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

ANSWER = {"results": [{"intent": "floor", "confidence": 1.0, "destination": "queue-0"}]}


def _api() -> FastAPI:
    return FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


single_api = _api()


@serve.deployment(name="Ingress")
@serve.ingress(single_api)
class Single:
    @single_api.get("/readyz")
    async def ready(self) -> dict:
        return {}

    @single_api.post("/v1/route")
    async def route(self, request: Request) -> dict:
        await request.body()
        return ANSWER


@serve.deployment
class Hop:
    """A deployment that hands back what it was given (deployed as each of the three)."""

    async def __call__(self, body: bytes) -> bytes:
        return body


shape_api = _api()


@serve.deployment(name="Ingress")
@serve.ingress(shape_api)
class Shape:
    def __init__(
        self, tokenizer: DeploymentHandle, classifier: DeploymentHandle, router: DeploymentHandle
    ) -> None:
        self.tokenizer, self.classifier, self.router = tokenizer, classifier, router

    @shape_api.get("/readyz")
    async def ready(self) -> dict:
        return {}

    @shape_api.post("/v1/route")
    async def route(self, request: Request) -> dict:
        ids = await self.tokenizer.remote(await request.body())
        logits = await self.classifier.remote(ids)
        await self.router.remote(logits)
        return ANSWER


single = Single.bind()
shape = Shape.bind(*(Hop.options(name=name).bind() for name in ("Tokenizer", "Classifier", "Router")))
