"""``t5x-lite serve``: a work dir's model behind an HTTP JSON API, concurrent requests batched.

The model is loaded once (sharded on the config's mesh, as ``decode`` loads it) and one thread,
the *engine*, owns the devices: HTTP handler threads parse and check a request, tokenize it and
queue it; the engine takes the oldest queued request, waits ``batch_wait`` seconds for others
that may share its batch and runs them as one generation (``decoding.generate_parts``). Rows of
one batch decode exactly as they would alone (prompts are left-padded, see ``decoding``), so
batching changes no greedy output; it only changes how many rows each compiled step carries.

Which requests share a batch: greedy ones with greedy ones, unseeded sampling ones with those of
the same temperature / top-k / top-p, as long as the rows fit ``max_batch`` and the longest
prompt plus the most new tokens fit the model's ``max_length``. A batch's rows are padded to a
power of two (repeating a row) and its new tokens rounded up to one (what each request asked for
is cut out afterwards), so a stream of requests of any sizes compiles a handful of programs. A
request with a ``seed``, or with beams, runs alone and exactly as the Python API would run it
(``generate_details(..., seed=seed)``, ``beam_search``): same request, same answer.

When a request of the batch streams (``stream: true``), the batch runs in parts of
``stream_tokens`` tokens (the same tokens: the KV cache and the random stream carry over from
part to part on the device); after each part the streamed requests get their new text as
server-sent events, and any request whose rows are all done is answered then, while the rest of
its batch goes on.

Endpoints, shaped as OpenAI's (their field names and defaults: ``max_tokens`` 16, ``temperature``
1, so standard clients work unchanged):

- ``POST /v1/completions`` (decoder, encoder_decoder): ``prompt`` (a string, a list of strings,
  a token list or a list of token lists), ``max_tokens``, ``temperature``, ``top_p``, ``top_k``
  (0 = off), ``n``, ``seed``, ``stop`` (up to 4 strings: the text is cut before the first),
  ``logprobs`` (k: each generated token's log-probability and its k likeliest alternatives),
  ``echo`` (the prompt first, with its tokens' log-probabilities; ``max_tokens`` 0 scores the
  prompt alone: what evaluation harnesses ask), ``stream`` and ``stream_options.include_usage``,
  ``num_beams`` and ``length_penalty`` (beam search, deterministic). A text prompt is tokenized as
  ``decode`` does (BOS first for a decoder, EOS last for an encoder's input); a token list is taken
  as it is. Alternatives and echo run one more forward pass over prompt + completion after the
  generation (``decoding.score_tokens``), for the batch's rows together; without them a token's
  log-probability is the decoding loop's.
- ``POST /v1/chat/completions``: ``messages`` rendered by the work dir's chat template
  (``data.chat_template``; ``import-hf`` keeps a model's), the same sampling fields.
- ``POST /v1/fill-mask`` (encoder): ``inputs`` (a string or a list, each with ``<mask>``),
  ``top_k`` candidates per mask.
- ``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``: the tokenizer as vLLM serves
  it (lm-evaluation-harness's remote tokenizer uses them).
- ``GET /v1/models``, ``GET /health`` (model, step, requests and batches served, queue length).

A request the server cannot honour is refused with HTTP 400 and a message naming the field
(penalties and ``logit_bias`` are not implemented, nor streamed logprobs, echo or beams; an
unknown field is an error, not silently ignored). One process: a model spread over hosts decodes
with ``decode --input``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

import numpy as np

from t5x_lite import partitioning
from t5x_lite.config import Config, ConfigError
from t5x_lite.decoding import (
    MASK_TOKEN,
    beam_search,
    check_generation_args,
    fill_candidates,
    fill_mask,
    generate_parts,
    mesh_of,
    prepare_params,
    score_tokens,
    step_text,
    text_prompt_ids,
)

MAX_BODY_BYTES = 16 << 20
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20  # likeliest alternatives a token's logprobs may list
PIECE_WINDOW = 8  # tokens of context when finding the text a token adds


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with ``message`` naming the field ``param``."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


_LOG_LOCK = threading.Lock()


def _log(message: str) -> None:
    with _LOG_LOCK:  # one line at a time from the handler threads
        sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {message}\n")
        sys.stderr.flush()


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ----------------------------------------------------------------------------- the engine


class Job:
    """One request's work: ``rows`` of token ids (a prompt repeated ``n`` times gives ``n`` rows)
    and how to continue them. ``kind``: "generate" or "fill" (encoder masks)."""

    def __init__(self, rows: list, kind: str = "generate", max_new: int = 16, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: Optional[int] = None, num_beams: int = 1,
                 length_penalty: float = 1.0, stream: bool = False, score_top: Optional[int] = None):
        self.rows = [np.asarray(r, np.int32) for r in rows]
        self.kind, self.max_new = kind, max_new
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.seed, self.num_beams, self.length_penalty = seed, num_beams, float(length_penalty)
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        # streamed: the rows' results so far (lists of RowResult) after every part the device makes
        self.parts: Optional[queue.Queue] = queue.Queue() if stream else None
        # not None: after generating, one forward pass scores every token of prompt + completion,
        # with this many likeliest alternatives per position (echo, logprobs > 0)
        self.score_top = score_top

    @property
    def batch_key(self) -> Optional[tuple]:
        """Jobs of one key may share a batch; None runs alone (seeded sampling, beams)."""
        if self.kind == "fill":
            return ("fill", self.top_k)
        if self.seed is not None or self.num_beams > 1:
            return None
        if self.temperature == 0:
            return ("greedy", self.score_top)
        return ("sample", self.temperature, self.top_k, self.top_p, self.score_top)


class RowResult:
    """One row's outcome: the generated ``tokens`` (up to, not including, a stop token) and their
    ``logprobs`` (None for beams); ``stop`` the stop token that ended it and its log-probability
    (None: it ran to its length); ``generated``: tokens made, the stop token included; ``scores``
    (``decoding.TokenScores`` of prompt + tokens + stop token) when its job asked; for fill jobs
    ``fills`` (``decoding.MaskFill``s)."""

    def __init__(self, tokens=(), logprobs=None, stop=None, fills=None):
        self.tokens, self.logprobs, self.stop, self.fills = list(tokens), logprobs, stop, fills
        self.scores = None

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    @property
    def generated(self) -> int:
        return len(self.tokens) + self.stopped


class Engine:
    """The one thread that runs the model: takes queued jobs, batches them, sets their futures."""

    def __init__(self, cfg: Config, params, stop_ids: list, start_id: int, mask_id: Optional[int] = None,
                 max_batch: int = 32, batch_wait: float = 0.005, stream_tokens: int = 8,
                 log: Callable[[str], None] = _log):
        if max_batch < 1:
            raise ConfigError(f"--max-batch-size={max_batch} must be >= 1")
        if batch_wait < 0:
            raise ConfigError(f"--batch-wait-ms must be >= 0, got {batch_wait * 1e3:g}")
        if stream_tokens < 1:
            raise ConfigError(f"--stream-tokens={stream_tokens} must be >= 1")
        self.stream_tokens = stream_tokens
        self.cfg, self.mesh = cfg, mesh_of(params) or partitioning.make_mesh(cfg)
        self.params = prepare_params(cfg, params, self.mesh)  # once, not again every batch
        self.stop_ids, self.start_id, self.mask_id = list(stop_ids), start_id, mask_id
        self.max_batch, self.batch_wait, self.log = max_batch, batch_wait, log
        self.queue: queue.Queue = queue.Queue()
        self.pending: collections.deque = collections.deque()
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "padding_rows": 0, "tokens": 0}
        self._seed = int.from_bytes(os.urandom(4), "little")  # unseeded sampling: a new key a batch
        self._thread = threading.Thread(target=self._loop, name="t5x-lite-engine", daemon=True)
        self._stopping = False

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the queued jobs (a minute at most), then end the thread."""
        self._stopping = True
        self.queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def submit(self, job: Job) -> concurrent.futures.Future:
        if len(job.rows) > self.max_batch:
            raise RequestError(f"{len(job.rows)} rows (prompts x n) exceed the server's batch of "
                               f"{self.max_batch} (--max-batch-size)", "n")
        self.queue.put(job)
        return job.future

    @property
    def queued(self) -> int:
        return self.queue.qsize() + len(self.pending)

    # ------------------------------------------------------------------ batching

    def _fits(self, jobs: list) -> bool:
        rows = [r for j in jobs for r in j.rows]
        if len(rows) > self.max_batch:
            return False
        if self.cfg.model.family != "decoder" or jobs[0].kind == "fill":
            return True
        return max(len(r) for r in rows) + max(j.max_new for j in jobs) <= self.cfg.model.max_length

    def next_batch(self, block: bool = True) -> list:
        """The oldest pending job and the later ones that may share its batch (waiting up to
        ``batch_wait`` for more to arrive while there is room)."""
        if not self.pending:
            job = self.queue.get(block=block)
            if job is None:
                return []
            self.pending.append(job)
        first = self.pending[0]
        deadline = time.monotonic() + self.batch_wait
        while first.batch_key is not None and sum(len(j.rows) for j in self.pending) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stopping: finish what is pending first
                self.queue.put(None)
                break
            self.pending.append(job)
        batch = [self.pending.popleft()]
        if first.batch_key is not None:
            for job in list(self.pending):
                if job.batch_key == first.batch_key and self._fits(batch + [job]):
                    batch.append(job)
                    self.pending.remove(job)
        return batch

    def _loop(self) -> None:
        while not (self._stopping and not self.pending and self.queue.empty()):
            batch = self.next_batch()
            if batch:
                self.run(batch)

    # ------------------------------------------------------------------ running

    def run(self, batch: list) -> None:
        """Run ``batch`` (jobs of one key) as one call; set each job's future (a job whose rows
        are all done is answered at once, while the others of its batch go on)."""
        t0 = time.time()
        try:
            tokens = self._run(batch)
        except Exception as e:  # a failure ends these requests, not the server
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(e)
            self.log(f"batch of {len(batch)} request(s) failed: {type(e).__name__}: {e}")
            return
        rows = sum(len(j.rows) for j in batch)
        self.stats["requests"] += len(batch)
        self.stats["batches"] += 1
        self.stats["rows"] += rows
        self.stats["tokens"] += tokens
        dt = time.time() - t0
        what = f"{tokens} new tokens ({tokens / dt:.1f}/s)" if batch[0].kind == "generate" else "masks filled"
        self.log(f"batch {self.stats['batches']}: {len(batch)} request(s), {rows} row(s), {what} "
                 f"in {dt:.2f}s (compiles included)")

    def _run(self, batch: list) -> int:
        """Run ``batch``, answering its jobs; returns the tokens generated."""
        first = batch[0]
        rows = [r for j in batch for r in j.rows]
        padded = rows + [rows[-1]] * (min(_pow2(len(rows)), self.max_batch) - len(rows))
        if first.kind == "fill":
            self.stats["padding_rows"] += len(padded) - len(rows)
            fills = fill_mask(self.cfg, self.params, padded, first.top_k, mask_id=self.mask_id, mesh=self.mesh)
            for job, part in zip(batch, self._split(batch, [RowResult(fills=f) for f in fills])):
                job.future.set_result(part)
            return 0
        common = dict(eos_id=self.stop_ids, start_id=self.start_id, mesh=self.mesh)
        if first.num_beams > 1:  # alone, as beam_search runs it
            seqs = beam_search(self.cfg, self.params, first.rows, first.max_new, first.num_beams,
                               first.length_penalty, **common).sequences[:, 0]
            results = [self._row(s, None) for s in seqs]
            first.future.set_result(results)
            return sum(r.generated for r in results)
        if first.batch_key is None:  # seeded: alone, as generate_details(..., seed) runs it
            padded, new, seed = rows, first.max_new, first.seed
        else:  # new tokens rounded up (fewer programs), what each job asked for cut out
            self.stats["padding_rows"] += len(padded) - len(rows)
            want = max(j.max_new for j in batch)
            room = self.cfg.model.max_length - (max(map(len, rows)) if self.cfg.model.family == "decoder" else 1)
            new = max(want, min(_pow2(want), room)) if want else 0
            self._seed = seed = (self._seed + 1) % (1 << 31)
        streamed = any(j.parts is not None for j in batch)
        made: list = [([], []) for _ in rows]  # tokens, logprobs of each row so far
        owners = [(j, r) for j, job in enumerate(batch) for r in range(len(job.rows))]
        left, ended = set(range(len(batch))), set()  # jobs not answered yet; rows that made a stop token
        parts = generate_parts(self.cfg, self.params, padded, new, first.temperature, first.top_k, first.top_p,
                               seed, part_tokens=self.stream_tokens if streamed else new,
                               **common) if new else ()  # max_tokens 0 (echo): nothing to generate
        for part in parts:
            for i, (j, _) in enumerate(owners):
                tokens, logprobs = made[i]
                want = batch[j].max_new - len(tokens)
                if want > 0 and i not in ended:
                    tokens.extend(int(t) for t in part.tokens[i, :want])
                    logprobs.extend(float(x) for x in part.logprobs[i, :want])
                    if any(t in self.stop_ids for t in tokens[-want:]):
                        ended.add(i)
            self._answer(batch, owners, made, left, final=False)
            if not left:
                break
        self._answer(batch, owners, made, left, final=True)
        return sum(self._row(*m).generated for m in made)

    def _answer(self, batch: list, owners: list, made: list, left: set, final: bool) -> None:
        """Answer the jobs of ``left`` whose rows are all done (every one when ``final``; a job
        that wants its tokens scored waits for the end of the batch, which scores them together);
        send the streamed ones the rows so far."""
        ready, going = {}, {}
        for j in sorted(left):
            job = batch[j]
            results = [self._row(*made[i]) for i, (o, _) in enumerate(owners) if o == j]
            if final or (job.score_top is None and all(r.stopped or r.generated >= job.max_new for r in results)):
                ready[j] = results
            elif job.parts is not None:
                going[j] = results
        scored = [(batch[j], results) for j, results in ready.items() if batch[j].score_top is not None]
        if scored:
            self._score(scored)
        for j, results in ready.items():
            batch[j].future.set_result(results)
            left.discard(j)
        for j, results in going.items():
            batch[j].parts.put(results)

    def _score(self, jobs: list) -> None:
        """Score prompt + generated tokens (stop token included) of every row of ``jobs`` in one
        forward pass (rows padded to a power of two), setting each result's ``scores``."""
        seqs = [np.concatenate([prompt, np.asarray(r.tokens + ([r.stop[0]] if r.stop else []), np.int32)])
                for job, results in jobs for prompt, r in zip(job.rows, results)]
        top = jobs[0][0].score_top
        padded = seqs + [seqs[-1]] * (min(_pow2(len(seqs)), max(self.max_batch, len(seqs))) - len(seqs))
        scores = iter(score_tokens(self.cfg, self.params, padded, top, mesh=self.mesh))
        for _, results in jobs:
            for r in results:
                r.scores = next(scores)

    def _row(self, tokens, logprobs) -> RowResult:
        tokens = [int(t) for t in tokens]
        stops = [k for k, t in enumerate(tokens) if t in self.stop_ids]
        end = stops[0] if stops else len(tokens)
        stop = (tokens[end], None if logprobs is None else float(logprobs[end])) if stops else None
        lp = None if logprobs is None else [float(x) for x in logprobs[:end]]
        return RowResult(tokens[:end], lp, stop)

    @staticmethod
    def _split(batch: list, results: list) -> list:
        out, i = [], 0
        for job in batch:
            out.append(results[i:i + len(job.rows)])
            i += len(job.rows)
        return out


# ----------------------------------------------------------------------------- requests


def _number(body: dict, name: str, default, *, integer: bool = False, low=None, high=None, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise RequestError(f"{name}={value!r} must be {'an integer' if integer else 'a number'}", name)
    if not math.isfinite(value):
        raise RequestError(f"{name}={value!r} must be finite", name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise RequestError(f"{name}={value!r} must be in {bounds}", name)
    return int(value) if integer else float(value)


SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "logprobs", "stream",
                   "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "user", "num_beams", "length_penalty"}
FIELDS = {
    "/v1/completions": SAMPLING_FIELDS | {"prompt", "echo", "best_of", "suffix"},
    "/v1/chat/completions": SAMPLING_FIELDS | {"messages", "top_logprobs", "max_completion_tokens"},
    "/v1/fill-mask": {"model", "inputs", "top_k"},
    "/tokenize": {"model", "prompt", "add_special_tokens"},
    "/detokenize": {"model", "tokens"},
}


class Service:
    """What the HTTP server does with a request, apart from HTTP: ``handle(method, path, body)``
    returns ``(status, JSON object)``."""

    def __init__(self, cfg: Config, params, tokenizer, stop_ids: list, *, name: str = "t5x_lite",
                 step: Optional[int] = None, chat_template: Optional[dict] = None, max_batch: int = 32,
                 batch_wait: float = 0.005, stream_tokens: int = 8, log: Callable[[str], None] = _log):
        self.cfg, self.tokenizer, self.name, self.step, self.chat = cfg, tokenizer, name, step, chat_template
        self.family = cfg.model.family
        self.engine = Engine(cfg, params, stop_ids, tokenizer.bos_id, tokenizer.mask_id, max_batch=max_batch,
                             batch_wait=batch_wait, stream_tokens=stream_tokens, log=log)
        self.created = int(time.time())

    def start(self) -> "Service":
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

    def handle(self, method: str, path: str, body: Optional[bytes]) -> tuple:
        """``(HTTP status, a JSON object)``, or ``(200, an iterator of server-sent events)`` for a
        streamed completion."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        try:
            gets = {"/health": self._health, "/v1/models": self._models, "/tokenizer_info": self._tokenizer_info}
            if path in gets:
                if method != "GET":
                    raise RequestError(f"{path} takes GET, not {method}", status=405)
                return 200, gets[path]()
            if path not in FIELDS:
                raise RequestError(f"no endpoint {path}: POST {', '.join(FIELDS)}; GET {', '.join(gets)}", status=404)
            if method != "POST":
                raise RequestError(f"{path} takes POST, not {method}", status=405)
            request = self._json(body)
            unknown = sorted(set(request) - FIELDS[path])
            if unknown:
                raise RequestError(f"unknown field(s) {unknown} for {path}; it takes {sorted(FIELDS[path])}",
                                   unknown[0])
            posts = {"/v1/completions": lambda r: self._complete(r, chat=False),
                     "/v1/chat/completions": lambda r: self._complete(r, chat=True),
                     "/v1/fill-mask": self._fill, "/tokenize": self._tokenize, "/detokenize": self._detokenize}
            return 200, posts[path](request)
        except RequestError as e:
            return e.status, {"error": {"message": str(e), "type": "invalid_request_error", "param": e.param,
                                        "code": None}}
        except Exception as e:  # the model failed: say so, keep serving
            return 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                                   "code": None}}

    # ------------------------------------------------------------------ endpoints

    def _health(self) -> dict:
        return {"status": "ok", "model": self.name, "family": self.family, "step": self.step,
                "queued": self.engine.queued, **self.engine.stats}

    def _models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "t5x_lite", "max_model_len": self.cfg.model.max_length}]}

    # The tokenizer, as vLLM serves it (what lm-evaluation-harness's remote tokenizer reads)

    def _specials(self) -> dict:
        """``{"eos_token": (its name, its id), ...}`` of the special tokens the tokenizer has."""
        tok = self.tokenizer
        roles = {"eos_token": tok.eos_id, "bos_token": tok.bos_id, "pad_token": tok.pad_id}
        return {role: (tok.token_name(i), i) for role, i in roles.items() if i is not None and i >= 0}

    def _tokenizer_info(self) -> dict:
        names = {role: name for role, (name, _) in self._specials().items()}
        return {**names, "tokenizer_class": type(self.tokenizer).__name__,
                "model_max_length": self.cfg.model.max_length, "vocab_size": self.cfg.model.vocab_size,
                "chat_template": None if self.chat is None else self.chat["template"]}

    def _tokenize(self, request: dict) -> dict:
        """``{"tokens", "count", "max_model_len"}`` of ``prompt``; ``add_special_tokens`` (default
        true) adds what ``/v1/completions`` adds to a text prompt (BOS for a decoder, EOS after an
        encoder-decoder's input). A prompt that is exactly a special token's name is that token."""
        text, add = request.get("prompt"), request.get("add_special_tokens", True)
        if not isinstance(text, str):
            raise RequestError("prompt must be a string", "prompt")
        if not isinstance(add, bool):
            raise RequestError("add_special_tokens must be true or false", "add_special_tokens")
        names = dict(self._specials().values())
        if text in names:
            ids = [names[text]]
        else:
            ids = [int(t) for t in (self._text_ids(text) if add else self.tokenizer.encode(text))]
        return {"tokens": ids, "count": len(ids), "max_model_len": self.cfg.model.max_length}

    def _detokenize(self, request: dict) -> dict:
        tokens = request.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise RequestError("tokens must be a list of token ids", "tokens")
        bad = [t for t in tokens if not 0 <= t < self.cfg.model.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.model.vocab_size})", "tokens")
        return {"prompt": self.tokenizer.decode(tokens)}

    @staticmethod
    def _json(body: Optional[bytes]) -> dict:
        try:
            request = json.loads(body or b"")
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not JSON ({e})") from None
        if not isinstance(request, dict):
            raise RequestError(f"the body must be a JSON object, not {type(request).__name__}")
        return request

    def _complete(self, request: dict, chat: bool):
        if self.family == "encoder":
            raise RequestError("this is an encoder model: it fills masks (POST /v1/fill-mask), it does not generate")
        job, prompts, stops, logprobs, echo = self._generation_job(request, chat)
        future = self.engine.submit(job)
        if job.parts is not None:
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            return self._stream(job, future, len(prompts), stops, chat, usage)
        results = future.result()
        choices = []
        for i, (res, prompt) in enumerate(zip(results, job.rows)):
            text, lp, stopped = self._choice(res, prompt, stops, logprobs, echo)
            choice: dict = {"index": i, "finish_reason": "stop" if stopped else "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = None if lp is None else {"content": [
                    {"token": t, "logprob": p, "top_logprobs": [{"token": a, "logprob": v} for a, v in (top or {}).items()]}
                    for t, p, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"] or [None] * len(lp["tokens"]))]}
            else:
                choice.update(text=text, logprobs=lp)
            choices.append(choice)
        kind = "chatcmpl" if chat else "cmpl"
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.name, "choices": choices,
                "usage": self._usage(job, len(prompts), results)}

    @staticmethod
    def _usage(job: Job, prompts: int, results: list) -> dict:
        n = len(job.rows) // prompts
        prompt_tokens = sum(len(job.rows[k * n]) for k in range(prompts))
        completion_tokens = sum(r.generated for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _stream(self, job: Job, future, prompts: int, stops: list, chat: bool, usage: bool):
        """Server-sent events: a chunk of new text per choice as the device makes it (the text is
        held back while it could be the start of a stop string, or ends inside a character), the
        finish reasons, the usage if asked, then ``[DONE]``."""
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": self.name}
        sent = [""] * len(job.rows)

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(i: int, text: Optional[str], finish: Optional[str] = None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                body = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                body = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return dict(head, choices=[body])

        def news(results: list, final: bool):
            for i, res in enumerate(results):
                text = self._visible(self.tokenizer.decode(res.tokens), stops, final)[0]
                if len(text) > len(sent[i]):
                    yield event(chunk(i, text[len(sent[i]):]))
                    sent[i] = text

        if chat:
            for i in range(len(job.rows)):
                yield event(dict(head, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]))
        while not (future.done() and job.parts.empty()):
            try:
                results = job.parts.get(timeout=0.05)
            except queue.Empty:
                continue
            yield from news(results, final=False)
        try:
            results = future.result()
        except Exception as e:
            yield event({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                                   "code": None}})
            yield "data: [DONE]\n\n"
            return
        yield from news(results, final=True)
        for i, res in enumerate(results):
            stopped = res.stopped or self._visible(self.tokenizer.decode(res.tokens), stops, True)[1]
            yield event(chunk(i, None if chat else "", "stop" if stopped else "length"))
        if usage:
            yield event(dict(head, choices=[], usage=self._usage(job, prompts, results)))
        yield "data: [DONE]\n\n"

    @staticmethod
    def _visible(text: str, stops: list, final: bool) -> tuple[str, bool]:
        """``text`` as a stream may show it: cut before the first stop string (and whether it
        was); unless ``final``, less an end that may be the start of a stop string or a
        character still being made (sentencepiece's replacement character)."""
        cut = min((k for k in (text.find(s) for s in stops) if k >= 0), default=-1)
        if cut >= 0:
            return text[:cut], True
        if final:
            return text, False
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
        return text.rstrip("\ufffd"), False

    def _generation_job(self, request: dict, chat: bool) -> tuple:
        if request.get("suffix") is not None:
            raise RequestError("suffix is not supported by this server", "suffix")
        echo = request.get("echo")
        if echo not in (None, True, False):
            raise RequestError(f"echo={echo!r} must be true or false", "echo")
        stream = request.get("stream")
        if stream not in (None, True, False):
            raise RequestError(f"stream={stream!r} must be true or false", "stream")
        options = request.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
            raise RequestError("stream_options takes {\"include_usage\": bool}, with stream=true", "stream_options")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(request, name, 0.0) != 0:
                raise RequestError(f"{name} is not supported (only 0)", name)
        if request.get("logit_bias") not in (None, {}):
            raise RequestError("logit_bias is not supported", "logit_bias")
        for name in ("model", "user"):  # names only: any model name is this model
            if not isinstance(request.get(name) or "", str):
                raise RequestError(f"{name} must be a string", name)
        limit = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
        max_new = _number(request, limit, 16, integer=True, low=0 if echo else 1)
        temperature = _number(request, "temperature", 1.0, low=0)
        top_p = _number(request, "top_p", 1.0, low=0, high=1, low_open=True)
        top_k = _number(request, "top_k", 0, integer=True, low=-1)
        top_k = max(top_k, 0)  # -1: off, as vLLM spells it
        n = _number(request, "n", 1, integer=True, low=1)
        if request.get("best_of") not in (None, n):
            raise RequestError("best_of is not supported (only equal to n)", "best_of")
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"seed={seed!r} must be an integer", "seed")
        num_beams = _number(request, "num_beams", 1, integer=True, low=1)
        length_penalty = _number(request, "length_penalty", 1.0)
        logprobs = self._logprobs(request, chat)
        if num_beams > 1 and (logprobs is not None or echo):
            raise RequestError("logprobs or echo with beam search: a beam has a score, not per-token "
                               "log-probabilities", "logprobs")
        if stream and (num_beams > 1 or logprobs is not None or echo):
            raise RequestError("stream=true streams sampled or greedy text without logprobs or echo; beam search "
                               "(num_beams > 1), logprobs and echo answer whole", "stream")
        scored = logprobs is not None and (logprobs > 0 or echo)
        if (echo or scored) and (self.family != "decoder" or self.cfg.objective == "prefix"):
            what = "echo" if echo else f"logprobs={logprobs} (alternatives)"
            raise RequestError(f"{what} needs a causal decoder, which predicts its prompt token by token; "
                               f"this is a {self.cfg.objective} {self.family} model", "echo" if echo else "logprobs")
        try:
            check_generation_args(max_new_tokens=max(max_new, 1), temperature=temperature, top_k=top_k, top_p=top_p,
                                  num_beams=num_beams, length_penalty=length_penalty,
                                  vocab_size=self.cfg.model.vocab_size)
        except ConfigError as e:
            raise RequestError(str(e).replace("max_new_tokens", limit)) from None
        stops = request.get("stop")
        stops = [stops] if isinstance(stops, str) else [] if stops is None else stops
        if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
                or not all(isinstance(s, str) and s for s in stops)):
            raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS}", "stop")
        prompts = self._chat_prompt(request) if chat else self._prompts(request)
        self._check_lengths(prompts, max_new, limit)
        rows = [p for p in prompts for _ in range(n)]
        job = Job(rows, "generate", max_new, temperature, top_k, top_p, seed, num_beams, length_penalty,
                  stream=bool(stream), score_top=logprobs if scored else None)
        return job, prompts, stops, logprobs, bool(echo)

    @staticmethod
    def _logprobs(request: dict, chat: bool) -> Optional[int]:
        """None: no logprobs; k: each token's log-probability and its k likeliest alternatives."""
        if chat:
            value = request.get("logprobs")
            if value not in (None, True, False):
                raise RequestError("logprobs must be true or false", "logprobs")
            top = _number(request, "top_logprobs", 0, integer=True, low=0, high=MAX_TOP_LOGPROBS)
            if top and not value:
                raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
            return top if value else None
        value = request.get("logprobs")
        if value is None or value is False:
            return None
        return 0 if value is True else _number(request, "logprobs", 0, integer=True, low=0, high=MAX_TOP_LOGPROBS)

    def _text_ids(self, text: str) -> np.ndarray:
        return np.asarray(text_prompt_ids(self.cfg, self.tokenizer, text), np.int32)

    def _prompts(self, request: dict) -> list:
        prompt = request.get("prompt")
        if isinstance(prompt, str):
            return [self._text_ids(prompt)]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [np.asarray(prompt, np.int32)]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self._text_ids(p) for p in prompt]
        if (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt)
                and all(isinstance(t, int) and not isinstance(t, bool) for p in prompt for t in p)):
            return [np.asarray(p, np.int32) for p in prompt]
        raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of "
                           "such lists (none empty)", "prompt")

    def _chat_prompt(self, request: dict) -> list:
        from t5x_lite.data import chat

        if self.chat is None:
            raise RequestError("this model has no chat template (data.chat_template is unset; import-hf keeps a "
                               "model's): use /v1/completions", "messages")
        messages = request.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise RequestError("messages must be a non-empty list of {role, content} objects with string values",
                               "messages")
        try:
            text = chat.prompt_text(self.chat, messages)
        except Exception as e:  # the template's own checks (roles in order, ...)
            raise RequestError(f"the chat template refused these messages: {e}", "messages") from None
        return [self._text_ids(text)]

    def _check_lengths(self, rows: list, max_new: int, limit: str) -> None:
        m = self.cfg.model
        for i, r in enumerate(rows):
            bad = r[(r < 0) | (r >= m.vocab_size)]
            if bad.size:
                raise RequestError(f"prompt {i} holds token id {int(bad[0])}, outside the vocabulary "
                                   f"[0, {m.vocab_size})", "prompt")
            if len(r) > m.max_length:
                raise RequestError(f"prompt {i} has {len(r)} tokens, more than the model's {m.max_length} "
                                   "(model.max_length)", "prompt")
            if m.family == "decoder" and len(r) + max_new > m.max_length:
                raise RequestError(f"prompt {i} has {len(r)} tokens: with {limit}={max_new} that exceeds the model's "
                                   f"{m.max_length} (model.max_length); at most {m.max_length - len(r)} new tokens",
                                   limit)
        if m.family == "encoder_decoder" and 1 + max_new > m.max_length:
            raise RequestError(f"{limit}={max_new} exceeds the decoder's room of {m.max_length - 1} tokens "
                               "(model.max_length - 1)", limit)

    def _choice(self, res: RowResult, prompt: np.ndarray, stops: list, logprobs: Optional[int],
                echo: bool) -> tuple:
        """A row's ``(text, logprobs object or None, stopped)``: the completion's text cut before the
        first stop string (``echo``: after the prompt's); with ``logprobs``, one entry per token of
        it (``echo``: the prompt's first, the first token's None), the stop token that ended it
        included, and the ``logprobs`` likeliest alternatives of each (from the scoring pass when
        the job had one, else the decoding loop's log-probabilities)."""
        if logprobs is None and not echo:
            text, cut = self._visible(self.tokenizer.decode(res.tokens), stops, final=True)
            return text, None, res.stopped or cut
        scored = [int(t) for t in prompt]  # what the scoring pass read: the prompt, then the completion
        prompt = scored if echo else []
        ids = res.tokens + ([res.stop[0]] if res.stop else [])
        pieces = self._piece_texts(prompt + ids)
        head = "".join(pieces[:len(prompt)])
        text, cut = self._visible("".join(pieces[len(prompt):]), stops, final=True)
        kept, length = len(prompt), 0  # the completion's tokens that make its (cut) text, the stop token too
        while kept < len(pieces) and (not cut or length < len(text)):
            length += len(pieces[kept])
            kept += 1
        if logprobs is None:
            return head + text, None, res.stopped or cut
        if res.scores is not None:  # the scored positions of the entries given (nothing predicts position 0)
            given = range(0 if echo else len(scored), (0 if echo else len(scored)) + kept)
            values = [None if k == 0 else float(res.scores.logprobs[k]) for k in given]
            tops = [None if k == 0 else self._alternatives(scored + ids, k, res.scores, logprobs)
                    for k in given] if logprobs else None
        else:  # the decoding loop's
            values, tops = res.logprobs + ([res.stop[1]] if res.stop else []), None
        offsets = np.cumsum([0] + [len(p) for p in pieces[:kept]])[:-1].tolist()
        return head + text, {"tokens": pieces[:kept], "token_logprobs": values[:kept],
                             "top_logprobs": None if tops is None else tops[:kept],
                             "text_offset": offsets}, res.stopped or cut

    def _piece_texts(self, ids: list) -> list:
        """The text each token of ``ids`` adds (a stop token none): decoded after the tokens just
        before it (``PIECE_WINDOW``, not the whole prefix: linear in the length)."""
        out = []
        for k, t in enumerate(ids):
            out.append("" if t in self.engine.stop_ids else self._after(ids[max(0, k - PIECE_WINDOW):k], t))
        return out

    def _after(self, before: list, token: int) -> str:
        before = [t for t in before if t not in self.engine.stop_ids]
        a, b = self.tokenizer.decode(before), self.tokenizer.decode(before + [int(token)])
        return b[len(os.path.commonprefix([a, b])):]

    def _alternatives(self, ids: list, k: int, scores, top: int) -> dict:
        """``{text: log-probability}`` of the ``top`` likeliest tokens at position ``k`` (best first;
        of two that read the same, the likelier)."""
        out: dict = {}
        for alt, value in zip(scores.top_ids[k, :top], scores.top_logprobs[k, :top]):
            out.setdefault(self._after(ids[max(0, k - PIECE_WINDOW):k], int(alt)), float(value))
        return out

    def _fill(self, request: dict) -> dict:
        if self.family != "encoder":
            raise RequestError(f"/v1/fill-mask needs an encoder model; this one is {self.family}: "
                               "use /v1/completions")
        if self.tokenizer.mask_id is None:
            raise RequestError(f"the tokenizer has no {MASK_TOKEN} token")
        inputs = request.get("inputs")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise RequestError("inputs must be a string or a non-empty list of strings", "inputs")
        top_k = _number(request, "top_k", 5, integer=True, low=1, high=self.cfg.model.vocab_size)
        rows = [self._text_ids(x) for x in inputs]
        for i, r in enumerate(rows):
            if self.tokenizer.mask_id not in r:
                raise RequestError(f"input {i} holds no {MASK_TOKEN}: nothing to fill", "inputs")
        self._check_lengths(rows, 0, "top_k")
        results = self.engine.submit(Job(rows, "fill", top_k=top_k)).result()
        return {"model": self.name, "results": [fill_candidates(self.tokenizer, r.fills) for r in results]}


# ----------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    server_version = "t5x_lite"
    protocol_version = "HTTP/1.1"

    def _respond(self, method: str) -> None:
        body = None
        if method == "POST":
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_BODY_BYTES:
                self._send(413 if length > 0 else 400, {"error": {
                    "message": f"Content-Length must be 0 to {MAX_BODY_BYTES} bytes", "type": "invalid_request_error",
                    "param": None, "code": None}})
                return
            body = self.rfile.read(length)
        status, answer = self.server.service.handle(method, self.path, body)
        if status >= 400:  # a refused request says why in the log too (a client's author reads it there)
            self.server.service.engine.log(f"{method} {self.path} -> {status}: {answer['error']['message']}")
        self._send(status, answer)

    def _send(self, status: int, obj) -> None:
        if not isinstance(obj, dict):  # server-sent events, written as they come; the end of the body ends them
            self.send_response(status)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for event in obj:
                    self.wfile.write(event.encode("utf-8"))
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):  # the client left; the batch goes on without it
                pass
            return
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's names
        self._respond("GET")

    def do_POST(self):  # noqa: N802
        self._respond("POST")

    def do_PUT(self):  # noqa: N802
        self._respond("PUT")

    def do_DELETE(self):  # noqa: N802
        self._respond("DELETE")

    def log_message(self, fmt, *args):
        if self.server.access_log:
            _log(f"{self.address_string()} {fmt % args}")


class Server(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` answering with ``service`` (started and stopped with it)."""

    daemon_threads = True
    request_queue_size = 1024  # connections waiting to be accepted (socketserver's 5 reset a burst of clients)

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True):
        self.service, self.access_log = service, access_log
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def serve_in_thread(self) -> threading.Thread:
        self.service.start()
        thread = threading.Thread(target=self.serve_forever, name="t5x-lite-http", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.service.stop()


def open_service(workdir: str, step: Optional[int] = None, name: Optional[str] = None, max_batch: int = 32,
                 batch_wait: float = 0.005, stream_tokens: int = 8, log: Callable[[str], None] = _log) -> Service:
    """The ``Service`` of a work dir's (or export's) model (checkpoint ``step``, default the
    latest), sharded as the config's rules place it on all devices."""
    import jax

    from t5x_lite.checkpoints import open_for_inference
    from t5x_lite.data import chat
    from t5x_lite.decoding import cli_stop_ids

    if jax.process_count() > 1:
        raise ConfigError("serve runs in one process; a model spread over hosts decodes with "
                          "`t5x-lite decode --input` (every process runs it)")
    cfg, params, tokenizer, step = open_for_inference(workdir, step=step)
    template = chat.load(cfg.data.chat_template) if cfg.data.chat_template else None
    name = name or os.path.basename(os.path.abspath(workdir))
    return Service(cfg, params, tokenizer, cli_stop_ids(workdir, tokenizer), name=name, step=step,
                   chat_template=template, max_batch=max_batch, batch_wait=batch_wait, stream_tokens=stream_tokens,
                   log=log)


def run_serve_cli(args) -> int:
    """``t5x-lite serve --workdir DIR [--port 8000]``: serve until interrupted (Ctrl-C, SIGTERM)."""
    t0 = time.time()
    service = open_service(args.workdir, args.step, args.name, args.max_batch_size, args.batch_wait_ms / 1e3,
                           args.stream_tokens)
    try:
        server = Server(service, args.host, args.port, access_log=not args.quiet)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    endpoints = "POST /v1/fill-mask" if service.family == "encoder" else "POST /v1/completions, /v1/chat/completions"
    _log(f"serving the {service.family} model of {args.workdir}{step_text(service.step)} as {service.name!r} "
         f"on {server.url} (loaded in {time.time() - t0:.1f}s): {endpoints}; GET /health")
    service.start()

    def stop(signum, frame):  # SIGTERM (a scheduler's, `kill`): stop as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        service.stop()
    stats = service.engine.stats
    _log(f"stopped: {stats['requests']} request(s) in {stats['batches']} batch(es), {stats['tokens']} tokens generated")
    return 0
