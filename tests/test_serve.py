"""`t5x-lite serve`: batched requests == each request decoded alone, the OpenAI-shaped endpoints
== the Python API, bad requests refused with their reason, the CLI serves until interrupted."""

import json
import math
import os
import signal
import subprocess
import sys
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from t5x_lite import partitioning
from t5x_lite.decoding import fill_mask, generate, generate_details, score_tokens
from t5x_lite.serve import Engine, Job, Server, open_service

from helpers import tiny_cfg
from test_decoding import _corpus, quick_compiles, random_params  # noqa: F401 - quick_compiles: autouse

CHAT = {"template": "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                    "{% if add_generation_prompt %}<assistant>{% endif %}", "bos_token": "", "eos_token": ""}


def make_workdir(path, family, *overrides, chat_template=None):
    """A work dir as training leaves it (config, tokenizer, a checkpoint at step 3)."""
    from t5x_lite.checkpoints import Checkpoints
    from t5x_lite.data import Tokenizer
    from t5x_lite.trainer import write_workdir_config

    cfg = tiny_cfg(family, "model.vocab_size=320", "data.num_sentinels=8", *overrides)
    cfg.data.chat_template = chat_template
    write_workdir_config(cfg, path)
    Tokenizer.train(_corpus(), os.path.join(path, "tokenizer.model"), 320, 8, seed=0)
    ckpt = Checkpoints(path, cfg)
    ckpt.save(3, types.SimpleNamespace(params=random_params(cfg), opt_state={"count": np.zeros((), np.int32)}), {})
    ckpt.close()
    return path


@pytest.fixture(scope="module")
def single():
    return partitioning.make_mesh(tiny_cfg("decoder"), jax.devices()[:1])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A decoder work dir with a chat template, served on a free port (8 devices, ZeRO-sharded as
    the config says); its model loaded again on one device for the references."""
    from t5x_lite.checkpoints import load_for_inference

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "chat.json").write_text(json.dumps(CHAT))
    path = make_workdir(str(tmp / "wd"), "decoder", "model.num_kv_heads=2", chat_template=str(tmp / "chat.json"))
    logs = []
    server = Server(open_service(path, max_batch=8, log=logs.append), port=0, access_log=False)
    server.serve_in_thread()
    single = partitioning.make_mesh(tiny_cfg("decoder"), jax.devices()[:1])
    cfg, params, tok = load_for_inference(path, mesh=single)
    yield types.SimpleNamespace(url=server.url, service=server.service, cfg=cfg, params=params, tok=tok, logs=logs,
                                path=path)
    server.close()


def call(url, path, body=None, method="POST", raw=None):
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def until_stop(tokens, stops):
    out = []
    for t in map(int, tokens):
        if t in stops:
            break
        out.append(t)
    return out


def test_a_batch_of_requests_equals_each_request_alone(served, single):
    """Requests queued together: the engine batches the greedy ones that fit (another sampling key
    and a prompt + max_new past max_length wait for their own batch), pads the batch to a power
    of two and rounds its new tokens up, and each request gets what decoding it alone gives."""
    s = served
    engine = Engine(s.cfg, s.service.engine.params, [1], s.tok.bos_id, max_batch=8, batch_wait=0.0, log=s.logs.append)
    rng = np.random.default_rng(0)
    prompt = lambda n: [3] + rng.integers(5, 320, n - 1).tolist()
    a = Job([prompt(4)], max_new=3)
    b = Job([prompt(12), prompt(9)], max_new=7)  # two prompts in one request
    c = Job([prompt(5)], max_new=4, temperature=0.9)  # sampling: another batch
    d = Job([prompt(56)], max_new=2)  # 56 + 7 <= 64: joins a and b, leaves 8 new tokens of room
    e = Job([prompt(8)], max_new=40)  # 56 + 40 > 64: not with d
    for job in (a, b, c, d, e):
        engine.submit(job)
    first = engine.next_batch(block=False)
    assert first == [a, b, d]
    assert engine.next_batch(block=False) == [c] and engine.next_batch(block=False) == [e]
    engine.run(first)
    assert engine.stats["padding_rows"] == 0  # four rows: a power of two already
    for job in (a, b, d):
        rows = job.future.result()
        ref = generate_details(s.cfg, s.params, job.rows, job.max_new, eos_id=1, mesh=single)
        for res, tokens, logprobs in zip(rows, ref.tokens, ref.logprobs):
            assert res.tokens == until_stop(tokens, [1])
            np.testing.assert_allclose(res.logprobs, logprobs[:len(res.tokens)], rtol=1e-5, atol=1e-5)
    engine.run([e])  # alone (one row padded to itself), 40 rounded up to 56 = 64 - 8 of room
    ref = generate(s.cfg, s.params, e.rows, 40, eos_id=1, mesh=single)[0]
    assert e.future.result()[0].tokens == until_stop(ref, [1]) and len(ref) == 40


def test_a_request_done_early_is_answered_while_its_batch_goes_on(served):
    """A batch runs in parts when a job streams: each part goes to the streamed job, and a job
    whose rows are done is answered then, not when the batch's longest row is."""
    s = served
    engine = Engine(s.cfg, s.service.engine.params, [], s.tok.bos_id, max_batch=8, batch_wait=0.0,
                    stream_tokens=4, log=s.logs.append)
    short, long = Job([[3, 9, 14]], max_new=3), Job([[3, 40, 41, 12]], max_new=30, stream=True)
    seen = []
    short.future.add_done_callback(lambda _: seen.append(long.parts.qsize()))
    engine.submit(short)
    engine.submit(long)
    engine.run(engine.next_batch(block=False))
    assert seen == [0]  # answered after the first part, before the long job had any
    updates = [long.parts.get_nowait() for _ in range(long.parts.qsize())]
    assert [len(u[0].tokens) for u in updates] == [4, 8, 12, 16, 20, 24, 28]  # then its result: all 30
    final = long.future.result()[0].tokens
    assert len(final) == 30 and all(final[:len(u[0].tokens)] == u[0].tokens for u in updates)


def events(url, path, body):
    """The JSON objects of a server-sent event stream, and whether it ended with [DONE]."""
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=300) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        lines = [line for line in r.read().decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]], lines[-1] == "data: [DONE]"


def test_streamed_completions_equal_whole_ones(served):
    """stream=true: the text arrives in several events that join to the whole answer's text; the
    finish reasons and (stream_options.include_usage) the usage are the whole answer's. A stop
    string never leaks into the stream, not even its first characters."""
    s = served
    body = {"prompt": ["mo ne kato", "ri sa"], "max_tokens": 20, "temperature": 0}
    whole = call(s.url, "/v1/completions", body)[1]
    got, done = events(s.url, "/v1/completions", dict(body, stream=True, stream_options={"include_usage": True}))
    assert done and got[-1]["usage"] == whole["usage"] and got[-1]["choices"] == []
    for i, choice in enumerate(whole["choices"]):
        mine = [e["choices"][0] for e in got[:-1] if e["choices"][0]["index"] == i]
        assert sum(bool(c["text"]) for c in mine) >= 2  # 20 tokens, 8 a part: text in several events
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
    text = whole["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    got, _ = events(s.url, "/v1/completions", dict(body, prompt=body["prompt"][0], stream=True, stop=stop))
    streamed = "".join(e["choices"][0]["text"] for e in got)
    assert streamed == text[:text.find(stop)] and got[-1]["choices"][0]["finish_reason"] == "stop"

    chat = {"messages": [{"role": "user", "content": "ri mo ne"}], "max_tokens": 12, "temperature": 0}
    whole = call(s.url, "/v1/chat/completions", chat)[1]["choices"][0]
    got, done = events(s.url, "/v1/chat/completions", dict(chat, stream=True))
    deltas = [e["choices"][0]["delta"] for e in got]
    assert done and got[0]["object"] == "chat.completion.chunk" and deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas) == whole["message"]["content"]
    assert got[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] and deltas[-1] == {}


def test_streamed_text_holds_back_what_may_change():
    """A stream shows text cut before a stop string, and holds back an end that may begin one or
    that ends inside a character (which a later token completes)."""
    from t5x_lite.serve import Service

    visible = Service._visible
    assert visible("one two", ["two"], False) == ("one ", True)
    assert visible("one tw", ["two", "x"], False) == ("one ", False)
    assert visible("one tw", ["two"], True) == ("one tw", False)
    assert visible("caf\ufffd", [], False) == ("caf", False)
    assert visible("one two three", ["three", "two"], True) == ("one ", True)  # the first stop in the text


def test_completions_equal_generate_concurrently(served, single):
    """/v1/completions, several clients at once: greedy text equals decoding each prompt alone
    with the Python API (BOS first, as `decode` tokenizes), with OpenAI's response shape."""
    s = served
    prompts = ["kato rimo", "ba zi lu pe sa ne", "ri", "mo ne kato sa lu pe di fo ba"]
    bodies = [{"prompt": p, "max_tokens": 3 + 2 * i, "temperature": 0} for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: call(s.url, "/v1/completions", b), bodies))
    for body, (status, out) in zip(bodies, answers):
        assert status == 200, out
        ids = [s.tok.bos_id] + s.tok.encode(body["prompt"])
        tokens = until_stop(generate(s.cfg, s.params, [ids], body["max_tokens"], mesh=single)[0], [1])
        (choice,) = out["choices"]
        assert out["object"] == "text_completion" and out["model"] == "wd"
        assert choice["text"] == s.tok.decode(tokens) and choice["index"] == 0
        assert choice["finish_reason"] == ("stop" if len(tokens) < body["max_tokens"] else "length")
        assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": body["max_tokens"],
                                "total_tokens": len(ids) + body["max_tokens"]}


def test_seeded_sampling_logprobs_and_stop_strings(served, single):
    """A seed makes a request run alone as generate(..., seed) does: the same answer every time.
    logprobs=0 gives each token's log-probability (its strings make the text); `stop` cuts the
    text before the first stop string."""
    s = served
    body = {"prompt": ["kato rimo", "sa lu"], "max_tokens": 6, "temperature": 0.9, "top_k": 20, "seed": 5, "n": 2,
            "logprobs": 0}
    status, out = call(s.url, "/v1/completions", body)
    assert status == 200, out
    assert call(s.url, "/v1/completions", body)[1]["choices"] == out["choices"]
    ids = [[s.tok.bos_id] + s.tok.encode(p) for p in body["prompt"]]
    ref = generate_details(s.cfg, s.params, [ids[0], ids[0], ids[1], ids[1]], 6, 0.9, 20, seed=5, eos_id=[1],
                           mesh=single)
    assert len(out["choices"]) == 4
    for choice, tokens, logprobs in zip(out["choices"], ref.tokens, ref.logprobs):
        kept = until_stop(tokens, [1])
        assert choice["text"] == s.tok.decode(kept)
        lp = choice["logprobs"]
        assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == len(kept)
        assert lp["text_offset"] == [len("".join(lp["tokens"][:k])) for k in range(len(kept))]
        np.testing.assert_allclose(lp["token_logprobs"], logprobs[:len(kept)], rtol=1e-5, atol=1e-5)
    other = call(s.url, "/v1/completions", dict(body, seed=6))[1]["choices"]
    assert [c["text"] for c in other] != [c["text"] for c in out["choices"]]  # the seed is used

    greedy = {"prompt": "mo ne kato", "max_tokens": 12, "temperature": 0}
    text = call(s.url, "/v1/completions", greedy)[1]["choices"][0]["text"]
    stop = text[4:6]
    assert len(text) > 6 and stop.strip()
    (cut,) = call(s.url, "/v1/completions", dict(greedy, stop=[stop, "\u2603"]))[1]["choices"]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"


def test_loglikelihood_requests_as_evaluation_harnesses_send_them(served, single):
    """lm-evaluation-harness's loglikelihood request (token lists of context + continuation, echo,
    max_tokens 1, logprobs 1): every prompt token's log-probability given the ones before it
    (score_tokens: one forward pass), the top alternative at each position, then the generated
    token; the continuation's log-likelihood and "is greedy" come out as the harness reads them.
    max_tokens 0 scores the prompt alone."""
    s = served
    rng = np.random.default_rng(1)
    seqs = [[3] + rng.integers(5, 320, n).tolist() for n in (6, 11, 3)]
    body = {"model": None, "prompt": seqs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}  # as lm-evaluation-harness 0.4 sends it
    status, out = call(s.url, "/v1/completions", body)
    assert status == 200, out
    refs = score_tokens(s.cfg, s.params, seqs, top_k=1, mesh=single)
    for choice, seq, ref in zip(sorted(out["choices"], key=lambda c: c["index"]), seqs, refs):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(seq) + 1 and lp["token_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:len(seq)], ref.logprobs[1:], rtol=1e-5, atol=1e-5)
        ctxlen = len(seq) - 2  # the harness's continuation: the last two prompt tokens
        assert math.isclose(sum(lp["token_logprobs"][ctxlen:-1]), float(ref.logprobs[ctxlen:].sum()), rel_tol=1e-5)
        for k in range(1, len(seq)):  # "is greedy": the chosen token's value is the best alternative's
            assert (lp["token_logprobs"][k] == max(lp["top_logprobs"][k].values())) == (seq[k] == ref.top_ids[k, 0])
        assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # the greedy generated token
        assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith(s.tok.decode(seq))
        assert lp["text_offset"][1:] == np.cumsum([len(t) for t in lp["tokens"][:-1]]).tolist()
    status, out = call(s.url, "/v1/completions", dict(body, max_tokens=0, logprobs=0))
    assert status == 200 and [len(c["logprobs"]["token_logprobs"]) for c in out["choices"]] == [7, 12, 4]
    assert out["choices"][0]["logprobs"]["top_logprobs"] is None and out["usage"]["completion_tokens"] == 0


def test_top_logprobs_of_generated_tokens(served):
    """logprobs=k without echo: each generated token with its k likeliest alternatives (greedy: the
    chosen one is the likeliest); the chat endpoint gives the same numbers in its own shape."""
    s = served
    body = {"prompt": "kato rimo", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    (choice,) = call(s.url, "/v1/completions", body)[1]["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 6 and "".join(lp["tokens"]) == choice["text"]
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and value == max(top.values())
    plain = call(s.url, "/v1/completions", dict(body, logprobs=0))[1]["choices"][0]["logprobs"]
    np.testing.assert_allclose(plain["token_logprobs"], lp["token_logprobs"], rtol=1e-5, atol=1e-5)  # loop == pass
    chat = {"messages": [{"role": "user", "content": "ri"}], "max_tokens": 4, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    content = call(s.url, "/v1/chat/completions", chat)[1]["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) <= 2 for c in content)
    assert all(c["logprob"] == max(t["logprob"] for t in c["top_logprobs"]) for c in content)


def test_tokenizer_endpoints_as_vllm_serves_them(served):
    """/tokenizer_info, /tokenize, /detokenize (what lm-evaluation-harness's remote tokenizer reads):
    the work dir's tokenizer; a special token's name tokenizes to its id."""
    s = served
    status, info = call(s.url, "/tokenizer_info", method="GET")
    assert status == 200 and info["model_max_length"] == 64 and info["chat_template"] == CHAT["template"]
    tokens = lambda **b: call(s.url, "/tokenize", b)[1]["tokens"]
    assert tokens(prompt=info["eos_token"], add_special_tokens=False) == [s.tok.eos_id]
    assert tokens(prompt=info["bos_token"]) == [s.tok.bos_id]
    ids = s.tok.encode("kato rimo sa")
    assert tokens(prompt="kato rimo sa", add_special_tokens=False) == ids
    assert tokens(prompt="kato rimo sa") == [s.tok.bos_id] + ids  # what /v1/completions reads for this text
    assert call(s.url, "/detokenize", {"tokens": ids})[1] == {"prompt": "kato rimo sa"}
    status, out = call(s.url, "/detokenize", {"tokens": [5, 999]})
    assert status == 400 and "token id 999 is outside the vocabulary" in out["error"]["message"]


def test_chat_completions_use_the_chat_template(served):
    """/v1/chat/completions renders the conversation with the work dir's chat template and
    continues it: the same tokens as the rendered text given to /v1/completions."""
    s = served
    messages = [{"role": "system", "content": "ka"}, {"role": "user", "content": "ri mo ne"}]
    status, out = call(s.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 5, "temperature": 0})
    assert status == 200, out
    rendered = "<system> ka <user> ri mo ne <assistant>"
    plain = call(s.url, "/v1/completions", {"prompt": rendered, "max_tokens": 5, "temperature": 0})[1]
    (choice,) = out["choices"]
    assert out["object"] == "chat.completion" and choice["message"] == {
        "role": "assistant", "content": plain["choices"][0]["text"]}
    assert out["usage"] == plain["usage"]


@pytest.mark.parametrize("path, body, status, says", [
    ("/v1/completions", b"{", 400, "the body is not JSON"),
    ("/v1/completions", [1, 2], 400, "must be a JSON object, not list"),
    ("/v1/completions", {"prompt": "ka", "foo": 1}, 400, "unknown field(s) ['foo']"),
    ("/v1/completions", {"prompt": "ka", "stream": True, "logprobs": 0}, 400, "without logprobs"),
    ("/v1/completions", {"prompt": "ka", "stream_options": {"include_usage": True}}, 400, "with stream=true"),
    ("/v1/completions", {"prompt": "ka", "temperature": -1}, 400, "temperature=-1 must be in [0, inf]"),
    ("/v1/completions", {"prompt": "ka", "top_p": 0}, 400, "top_p=0 must be in (0, 1]"),
    ("/v1/completions", {"prompt": "ka", "max_tokens": 2.5}, 400, "max_tokens=2.5 must be an integer"),
    ("/v1/completions", {"prompt": [3, 7, 999]}, 400, "token id 999, outside the vocabulary [0, 320)"),
    ("/v1/completions", {"prompt": "ka " * 70}, 400, "more than the model's 64 (model.max_length)"),
    ("/v1/completions", {"prompt": [3, 7], "max_tokens": 63}, 400, "at most 62 new tokens"),
    ("/v1/completions", {"prompt": "ka", "logprobs": 21}, 400, "logprobs=21 must be in [0, 20]"),
    ("/v1/completions", {"prompt": "ka", "max_tokens": 0}, 400, "max_tokens=0 must be in [1, inf]"),
    ("/v1/completions", {"prompt": "ka", "echo": True, "stream": True}, 400, "without logprobs or echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ka"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs=true"),
    ("/v1/completions", {"prompt": "ka", "n": 9}, 400, "exceed the server's batch of 8"),
    ("/v1/completions", {"prompt": "ka", "num_beams": 2, "temperature": 0.5}, 400, "beam search (num_beams=2)"),
    ("/v1/completions", {"prompt": []}, 400, "prompt must be a string"),
    ("/v1/completions", {"prompt": "ka", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages must be a non-empty list"),
    ("/v1/fill-mask", {"inputs": "ka <mask>"}, 400, "needs an encoder model; this one is decoder"),
    ("/v1/nope", {}, 404, "no endpoint /v1/nope"),
    ("/v1/completions", None, 405, "takes POST, not GET"),
])
def test_bad_requests_are_refused_with_their_reason(served, path, body, status, says):
    raw = body if isinstance(body, bytes) else None
    got, out = call(served.url, path, None if raw else body, method="GET" if body is None else "POST", raw=raw)
    assert got == status and says in out["error"]["message"], out


def test_health_models_and_beams_after_refusals(served, single):
    """The server keeps serving after refused requests; /health counts what it served; beam
    search runs as beam_search does."""
    s = served
    assert call(s.url, "/v1/completions", {"prompt": "ka", "foo": 1})[0] == 400
    ids = [s.tok.bos_id] + s.tok.encode("kato rimo")
    out = call(s.url, "/v1/completions", {"prompt": ids, "max_tokens": 5, "num_beams": 3, "temperature": 0})[1]
    best = generate(s.cfg, s.params, [ids], 5, num_beams=3, mesh=single)[0]
    assert out["choices"][0]["text"] == s.tok.decode(until_stop(best, [1]))
    status, health = call(s.url, "/health", method="GET")
    assert status == 200 and health["status"] == "ok" and health["step"] == 3 and health["family"] == "decoder"
    assert health["requests"] >= 1 and health["queued"] == 0
    assert call(s.url, "/v1/models", method="GET")[1]["data"][0]["id"] == "wd"
    assert any("batch" in line and "request(s), 1 row(s), 5 new tokens" in line for line in s.logs)


def test_fill_mask_endpoint_equals_fill_mask(tmp_path, single):
    """An encoder work dir serves /v1/fill-mask (and refuses to generate): the candidates of
    fill_mask on the same tokens."""
    from t5x_lite.checkpoints import load_for_inference

    path = make_workdir(str(tmp_path / "enc"), "encoder")
    server = Server(open_service(path, max_batch=4, log=lambda _: None), port=0, access_log=False)
    server.serve_in_thread()
    try:
        texts = ["kato <mask> rimo", "<mask> sa lu <mask>"]
        status, out = call(server.url, "/v1/fill-mask", {"inputs": texts, "top_k": 3})
        assert status == 200, out
        cfg, params, tok = load_for_inference(path, mesh=single)
        ref = fill_mask(cfg, params, [tok.encode(t) for t in texts], 3, mask_id=tok.mask_id, mesh=single)
        assert [len(r) for r in out["results"]] == [1, 2]
        for got, want in zip(out["results"], ref):
            for g, w in zip(got, want):
                assert g["position"] == w.position
                assert [c["token"] for c in g["candidates"]] == [tok.decode([t]) for t in w.token_ids]
                np.testing.assert_allclose([c["prob"] for c in g["candidates"]], w.probs, rtol=1e-5)
        status, out = call(server.url, "/v1/completions", {"prompt": "ka"})
        assert status == 400 and "fills masks" in out["error"]["message"]
        status, out = call(server.url, "/v1/fill-mask", {"inputs": "kato rimo"})
        assert status == 400 and "holds no <mask>" in out["error"]["message"]
    finally:
        server.close()


def test_encoder_decoder_completions_equal_generate(tmp_path, single):
    """An encoder_decoder work dir: the encoder reads the prompt (EOS last, as `decode` gives it),
    the decoder starts from BOS; requests batched together answer as each alone."""
    from t5x_lite.checkpoints import load_for_inference

    path = make_workdir(str(tmp_path / "t5"), "encoder_decoder")
    server = Server(open_service(path, max_batch=4, batch_wait=0.5, log=lambda _: None), port=0, access_log=False)
    server.serve_in_thread()
    try:
        cfg, params, tok = load_for_inference(path, mesh=single)
        bodies = [{"prompt": p, "max_tokens": k, "temperature": 0} for p, k in [("kato rimo", 5), ("sa", 9)]]
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda b: call(server.url, "/v1/completions", b), bodies))
        for body, (status, out) in zip(bodies, answers):
            assert status == 200, out
            ref = generate(cfg, params, [tok.encode(body["prompt"]) + [tok.eos_id]], body["max_tokens"],
                           start_id=tok.bos_id, mesh=single)[0]
            assert out["choices"][0]["text"] == tok.decode(until_stop(ref, [1]))
        status, out = call(server.url, "/v1/completions", {"prompt": "ka", "max_tokens": 64})
        assert status == 400 and "exceeds the decoder's room of 63 tokens" in out["error"]["message"]
        status, out = call(server.url, "/v1/completions", {"prompt": "ka", "echo": True, "logprobs": 1})
        assert status == 400 and "echo needs a causal decoder" in out["error"]["message"]
    finally:
        server.close()


def test_cli_serves_until_interrupted(served):
    """`t5x-lite serve --port 0` logs where it listens, answers, and stops cleanly on SIGTERM (a
    scheduler's, `kill`'s), saying what it served."""
    proc = subprocess.Popen([sys.executable, "-m", "t5x_lite", "serve", "--workdir", served.path, "--port", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if " on http://" in line:
                break
        assert "serving the decoder model of" in lines[-1] and "at step 3" in lines[-1], "".join(lines)
        url = lines[-1].split(" on ")[1].split(" ")[0]
        status, out = call(url, "/v1/completions", {"prompt": "kato", "max_tokens": 2, "temperature": 0})
        assert status == 200 and out["choices"][0]["text"] == call(
            served.url, "/v1/completions", {"prompt": "kato", "max_tokens": 2, "temperature": 0})[1]["choices"][0]["text"]
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, rest
        assert "stopped: 1 request(s) in 1 batch(es), 2 tokens generated" in rest
    finally:
        proc.kill()
