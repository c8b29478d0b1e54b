"""The API key, in the fast suite (test_serve runs the server as a subprocess and is marked integration): the
app on a real uvicorn server in this process, listening on a port the kernel picks, and real HTTP requests."""

import threading
import time

import httpx
import pytest

from glm3.runtime.engine import BackgroundEngine, EngineConfig
from glm3.serve.app import create_app
from glm3.serve.engines import load_engine
from glm3.serve.server import listen

KEY = "fast-key-456"


@pytest.fixture(scope="module")
def url(tiny_dir):
    import uvicorn

    engine, tokenizer = load_engine(tiny_dir, EngineConfig(max_num_seqs=2))
    background = BackgroundEngine(engine)
    sock = listen("127.0.0.1", 0)  # the kernel's free port: nothing to race for
    server = uvicorn.Server(uvicorn.Config(create_app(background, tokenizer, "chatglm3-6b", KEY), log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(30)
    background.close()
    sock.close()


def test_every_api_route_needs_the_key_and_health_does_not(url):
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        for method, path in (("get", "/v1/models"), ("get", "/v1/stats"), ("post", "/v1/completions")):
            reply = httpx.request(method, url + path, json=body if method == "post" else None, headers=headers)
            assert reply.status_code == 401, (path, headers)
            assert reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(url + "/v1/models", headers=auth).json()["data"][0]["id"] == "chatglm3-6b"
    done = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=120)
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
