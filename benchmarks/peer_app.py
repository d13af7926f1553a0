"""The peer of the CPU serving benchmark: the single-process app a user would otherwise write
around the same model. FastAPI + uvicorn, no Ray, no batching: each request tokenizes,
classifies and routes in the request's own (thread-pool) call. Same model object, same
routing policy code, the same request shape and decisions as TransferDesk's POST /v1/route.

    PEER_MODEL=registry/x/v1 PEER_POLICY=policy.yaml PEER_RUNTIME=onnx-int8 \\
        uvicorn benchmarks.peer_app:app --port 8200
"""

from __future__ import annotations

import hmac
import os

from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel

from deployments.routing import decide, load_policy
from transferdesk.model.modeling import IntentModel

MODEL = IntentModel.from_pretrained(os.environ["PEER_MODEL"], "cpu", os.environ.get("PEER_RUNTIME", "torch"))
POLICY = load_policy(os.environ["PEER_POLICY"], MODEL.labels, MODEL.tasks)
KEY = os.environ.get("PEER_KEY", "").encode()
TOP_K = 3

app = FastAPI(title="plain FastAPI peer")


class RouteRequest(BaseModel):
    text: str | None = None
    texts: list[str] | None = None


@app.post("/v1/route")
def route(body: RouteRequest, authorization: str = Header("")) -> dict:
    if KEY and not hmac.compare_digest(authorization.removeprefix("Bearer ").encode(), KEY):
        raise HTTPException(401, "missing or invalid API key")
    texts = [body.text] if body.text is not None else body.texts or []
    if not texts:
        raise HTTPException(422, "send text or texts")
    predictions = MODEL.predict(texts, k=TOP_K + 1)
    return {
        "model_version": os.environ["PEER_MODEL"],
        "decisions": [decide(POLICY, p, TOP_K) for p in predictions],
    }
