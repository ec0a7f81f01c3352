"""The OpenAI-compatible API, driven by the official `openai` client against a live server."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from live_server import MODEL_NAME

from moeflow.sampling import SamplingParams
from moeflow.server.app import create_app
from moeflow.server.settings import ServerSettings

pytestmark = pytest.mark.timeout(120)

PROMPTS = ["the quick brown fox", "hello world, bonjour", "a mixture of experts routes every token", "hola"]


@pytest.fixture(scope="module")
def oai(live_server):
    return openai.OpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(live_server):
    with httpx.Client(base_url=live_server.base_url, timeout=60) as client:
        yield client


def offline(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params))[0].outputs[0]


def test_models_and_health(oai, http, live_server):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].max_model_len == 512 and 0 < models[0].vocab_size <= live_server.engine.spec.vocab_size
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_offline_generate(oai, offline_llm, prompt):
    want = offline(offline_llm, prompt, max_tokens=12, temperature=0)
    got = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(offline_llm.tokenizer.encode(prompt))


def test_streamed_completion_is_one_chunk_per_token(oai, offline_llm):
    want = offline(offline_llm, PROMPTS[0], max_tokens=10, temperature=0, ignore_eos=True)
    chunks = list(oai.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    token_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(token_chunks) == 10
    assert "".join(c.choices[0].text for c in token_chunks) == want.text
    assert token_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10


def test_stream_ends_with_done(http):
    with http.stream("POST", "/v1/completions", json={"prompt": "hola", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[len("data: "):])["object"] == "text_completion" for e in events[:-1])


def test_token_id_prompts_and_prompt_lists(oai, offline_llm):
    ids = [offline_llm.tokenizer.encode(p) for p in PROMPTS[1:3]]
    want = [offline(offline_llm, p, max_tokens=6, temperature=0).text for p in ids]
    for prompt in (ids, PROMPTS[1:3]):  # token-id lists, and texts
        got = oai.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [c.index for c in got.choices] == [0, 1, 2, 3]
        assert [c.text for c in got.choices] == [want[0], want[0], want[1], want[1]]
    single = oai.completions.create(model=MODEL_NAME, prompt=ids[0], max_tokens=6, temperature=0)
    assert single.choices[0].text == want[0]


def test_n_with_seed_is_seed_plus_index(oai):
    kw = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}
    fan = oai.completions.create(n=3, seed=7, **kw)
    assert len(fan.choices) == 3
    for i, choice in enumerate(fan.choices):
        assert choice.text == oai.completions.create(seed=7 + i, **kw).choices[0].text


def test_tiny_top_p_keeps_the_top_token(oai, offline_llm):
    greedy = offline(offline_llm, PROMPTS[0], max_tokens=6, temperature=0, ignore_eos=True).text
    got = oai.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, top_p=5e-324,
                                 extra_body={"ignore_eos": True})
    assert got.choices[0].text == greedy


def test_chat_equals_offline_generate(oai, offline_llm):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    tok = offline_llm.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    want = offline(offline_llm, ids, max_tokens=8, temperature=0, ignore_eos=True)
    got = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert got.choices[0].message.content == want.text and got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 8
    stream = oai.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert len(chunks) == 1 + 8 and chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(oai):
    got = oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                      temperature=0, logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = got.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top token is chosen


def test_echo_scores_the_prompt_like_offline_prompt_logprobs(oai, offline_llm):
    ids = offline_llm.tokenizer.encode(PROMPTS[2])
    want = offline_llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    got = oai.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [entry[t] for entry, t in zip(want.prompt_logprobs[1:], ids[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert got.usage.completion_tokens == 0 and got.choices[0].finish_reason == "length"
    # max_tokens=1 keeps the generated token after the prompt, as lm-eval's default request does
    got = oai.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert len(got.choices[0].logprobs.token_logprobs) == len(ids) + 1


def test_concurrent_requests_each_get_what_they_get_alone(live_server, offline_llm):
    jobs = [(PROMPTS[i % 4] * (1 + i % 3), 4 + 3 * i) for i in range(8)]
    alone = [offline(offline_llm, p, max_tokens=n, temperature=0, ignore_eos=True).text for p, n in jobs]

    async def run():
        client = openai.AsyncOpenAI(base_url=f"{live_server.base_url}/v1", api_key="unused", max_retries=0)
        async with client:
            outs = await asyncio.gather(*(client.completions.create(
                model=MODEL_NAME, prompt=p, max_tokens=n, temperature=0, extra_body={"ignore_eos": True})
                for p, n in jobs))
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == alone
    assert live_server.wait_idle()


def _long_request(stream: bool) -> dict:
    return {"model": MODEL_NAME, "prompt": "the", "max_tokens": 480, "ignore_eos": True, "stream": stream}


def test_streaming_client_that_disconnects_is_aborted(live_server):
    assert live_server.wait_idle()
    aborted = live_server.metric("moeflow:request_success_total", finished_reason="abort")
    with httpx.Client(base_url=live_server.base_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=_long_request(True)) as r:
        assert next(r.iter_lines()).startswith("data: ")
        assert live_server.engine.num_running == 1
    # the response is closed long before 480 tokens could be generated
    assert live_server.wait_idle(timeout=5)
    assert live_server.metric("moeflow:request_success_total", finished_reason="abort") == aborted + 1


def test_non_streaming_client_that_disconnects_is_aborted(live_server):
    assert live_server.wait_idle()
    aborted = live_server.metric("moeflow:request_success_total", finished_reason="abort")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live_server.base_url}/v1/completions", json=_long_request(False), timeout=0.5)
    assert live_server.wait_idle(timeout=5)
    assert live_server.metric("moeflow:request_success_total", finished_reason="abort") == aborted + 1


@pytest.mark.parametrize("body, param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": -5}, "top_k"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt"),
    ({"prompt": [1, 10**6]}, "prompt"),
    ({"prompt": "the " * 600}, "prompt"),
    ({"max_tokens": 511}, "max_tokens"),
    ({"stop": [""]}, "stop"),
    ({"prompt": None}, "prompt"),
])
def test_bad_completion_requests_are_400_naming_the_field(http, body, param):
    r = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hello", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("body, param", [({"prompt": "the " * 600}, "prompt"), ({"max_tokens": 511}, "max_tokens")])
def test_context_overflow_is_400_naming_max_model_len(http, body, param):
    r = http.post("/v1/completions", json={"prompt": "hello", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert "maximum context length is 512 tokens (max_model_len)" in r.json()["error"]["message"]


def test_bad_requests_through_the_openai_client(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="gpt-4", prompt="hi")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL_NAME, messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x " * 600}])
    assert e.value.body["param"] == "messages" and "max_model_len" in e.value.body["message"]


def test_malformed_json_is_400(http):
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_api_key_guards_v1_only(live_server):
    settings = ServerSettings(served_model_name=MODEL_NAME, model_dir="x", api_key="sesame")
    app = create_app(live_server.client, settings)  # a second app in front of the same engine

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            body = {"prompt": "hi", "max_tokens": 2}
            missing = await http.post("/v1/completions", json=body)
            wrong = await http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
            models = await http.get("/v1/models")
            right = await http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
            open_routes = [(await http.get(p)).status_code for p in ("/health", "/metrics")]
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(base_url="http://test/v1", api_key="nope", max_retries=0,
                                         http_client=http).models.list()
            return missing, wrong, models, right, open_routes

    missing, wrong, models, right, open_routes = asyncio.run(run())
    for r in (missing, wrong, models):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 200 and right.json()["usage"]["completion_tokens"] == 2
    assert open_routes == [200, 200]


METRICS = ["moeflow:num_requests_running", "moeflow:num_requests_waiting", "moeflow:prompt_tokens_total",
           "moeflow:generation_tokens_total", "moeflow:time_to_first_token_seconds_bucket",
           "moeflow:inter_token_latency_seconds_bucket", "moeflow:e2e_request_latency_seconds_bucket",
           "moeflow:request_success_total", "moeflow:expert_cache_hits_total", "moeflow:expert_cache_misses_total",
           "moeflow:expert_bytes_moved_total", "moeflow:expert_stall_seconds_total",
           "moeflow:expert_device_memory_bytes", "moeflow:cuda_graph_captures", "moeflow:decode_distinct_experts_total",
           "moeflow:decode_layer_steps_total", "moeflow:decode_remapped_picks_total",
           "moeflow:expert_prefetch_hits_total", "moeflow:expert_prefetch_wasted_total",
           "moeflow:step_duration_seconds_bucket", "moeflow:request_max_decode_wait_steps_bucket",
           "moeflow:scheduling_seconds_total", "moeflow:predictor_seconds_total"]


def test_metrics_exposition(http, live_server):
    http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in METRICS:
        assert f"\n{name}{{" in r.text, name
    assert live_server.metric("moeflow:generation_tokens_total") >= 3
    assert live_server.metric("moeflow:expert_cache_misses_total", layer="0") > 0  # 25% budget: it must miss
    pool = live_server.engine.cache.pool
    assert live_server.metric("moeflow:expert_device_memory_bytes") == pool.numel() * pool.element_size()
    assert live_server.metric("moeflow:decode_layer_steps_total") > 0
    assert live_server.metric("moeflow:request_max_decode_wait_steps_count") >= 1
    assert live_server.metric("moeflow:cuda_graph_captures") == live_server.engine.graph_captures
    # the request's prefill step and its two decode steps (at least: other tests share the server)
    assert live_server.metric("moeflow:step_duration_seconds_count", kind="prefill") >= 1
    assert live_server.metric("moeflow:step_duration_seconds_count", kind="decode") >= 2
    # the host time spent choosing those steps, as the engine counted it
    assert 0 < live_server.metric("moeflow:scheduling_seconds_total") <= live_server.engine.counters["schedule_s"]


def test_routing_and_request_hints(http, offline_llm):
    """routing picks exact or LYNX per request (an unknown value is a 400); hints and penalties reach the engine."""
    body = {"prompt": "hello there", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    exact = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert http.post("/v1/completions", json=body | {"routing": "exact"}).json()["choices"][0]["text"] == exact
    r = http.post("/v1/completions", json=body | {"routing": "lynx", "task": "chat", "ttft_slo_ms": 500,
                                                   "tpot_slo_ms": 50, "priority": 2})
    assert r.status_code == 200, r.text
    for bad in ({"routing": "fastest"}, {"ttft_slo_ms": -1}, {"priority": 1.5}, {"repetition_penalty": 0},
                {"presence_penalty": 3}):
        r = http.post("/v1/completions", json=body | bad)
        assert r.status_code == 400 and next(iter(bad)) in r.text, (bad, r.text)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "routing": "lynx",
            "repetition_penalty": 1.2, "min_p": 0.1}
    assert http.post("/v1/chat/completions", json=chat).status_code == 200


def test_tokenize_round_trip(http, offline_llm):
    from moeflow.server.logprobs import token_text

    text = "hello world, bonjour le monde, hello world"  # ids repeat: each distinct one is decoded once
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert r["tokens"] == offline_llm.tokenizer.encode(text, add_special_tokens=False)
    assert len(set(r["tokens"])) < len(r["tokens"])
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 512 and "".join(r["token_strs"]) == text
    assert r["token_strs"] == [token_text(offline_llm.tokenizer, t) for t in r["tokens"]]
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 2
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["chat_template"]


def test_server_is_idle_after_everything(live_server):
    time.sleep(0.1)
    assert live_server.wait_idle()
    assert live_server.client.queued == 0 and live_server.client._pending == 0


def test_request_fields_become_sampling_params():
    from moeflow.server.inputs import sampling_params
    from moeflow.server.protocol import CompletionRequest

    body = CompletionRequest(prompt="x", task="code", ttft_slo_ms=300, tpot_slo_ms=40, priority=1, min_p=0.05,
                             frequency_penalty=0.5)
    p = sampling_params(body, max_tokens=4, choice=0, default_routing="lynx")
    assert (p.routing, p.task, p.ttft_slo_ms, p.tpot_slo_ms, p.priority) == ("lynx", "code", 300, 40, 1)
    assert (p.min_p, p.frequency_penalty, p.repetition_penalty) == (0.05, 0.5, 1.0)
    exact = sampling_params(CompletionRequest(prompt="x", routing="exact"), max_tokens=4, choice=0,
                            default_routing="lynx")
    assert exact.routing == "exact", "a request's own routing wins over the server's default"
