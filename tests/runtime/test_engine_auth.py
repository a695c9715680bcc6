"""A real CPU vLLM engine started the way the operator starts one admits only the job token: on the OpenAI routes
and on the dev-mode control routes that load weights or run code on its workers; ``/health`` stays open for probes."""

from __future__ import annotations

import httpx
import pytest

from explorer import local_engine
from tests.auth import job_headers, trainer_headers

pytestmark = pytest.mark.vllm

GUARDED = [
    ("POST", "/v1/completions", {"model": "tiny", "prompt": "1+1=", "max_tokens": 2}),
    ("GET", "/v1/models", None),
    ("POST", "/collective_rpc", {"method": "ext_weight_version", "args": []}),
    ("POST", "/init_weight_transfer_engine", {"init_info": {}}),
    ("POST", "/update_weights", {"update_info": {}}),
    ("POST", "/pause", None),
    ("GET", "/weight_info", None),
    ("GET", "/metrics", None),
]


def test_every_engine_route_but_health_needs_the_job_token(cpu_engine: local_engine.LocalEngine) -> None:
    wrong = {"none": {}, "wrong": {"Authorization": "Bearer nope"}, "trainer token": trainer_headers()}
    with httpx.Client(base_url=cpu_engine.base_url, timeout=60.0) as http:
        assert http.get("/health").status_code == 200
        for who, headers in wrong.items():
            for method, path, body in GUARDED:
                response = http.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (who, path, response.text)
                assert "job-token" in response.json()["error"]
        # The same requests with the job token reach vLLM (the version route answers, generation works).
        assert http.get("/weight_info", headers=job_headers()).status_code == 200
        done = http.post("/v1/completions", json=GUARDED[0][2], headers=job_headers())
        assert done.status_code == 200 and done.json()["choices"], done.text
