"""A small OpenAI-compatible server on loopback that injects faults on request.

``plan`` maps a prompt's text to the faults its successive attempts get; an attempt past
the end of its list (or a prompt not in the plan) is answered normally. Faults:

    "429"        Too Many Requests with Retry-After (``retry_after`` seconds)
    "500" "503"  server errors;  "400" a client error that cannot succeed (echoes the key)
    "timeout"    answers only after ``hang_s`` (longer than the client's timeout)
    "reset"      closes the connection with a TCP reset, no response
    "malformed"  200 with a body that is not JSON
    "truncated"  200 whose body stops before its Content-Length
    "length"     a normal answer cut short (finish_reason "length")
    "wrong"      a normal answer with a wrong number in it

The answer to "what is N plus N?" is "the answer is 2N"; other prompts get an echo.
With a ``tok``enizer, responses carry per-token log-probs in that tokenizer's pieces.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, plan=None, *, tok=None, delay_s=0.0, hang_s=2.0, retry_after=0.05):
        self.plan = plan or {}
        self.tok = tok
        self.delay_s, self.hang_s, self.retry_after = delay_s, hang_s, retry_after
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.attempts: dict[tuple, int] = {}
        if tok is not None:
            texts = [tok.decode([i]) for i in range(len(tok))]
            self.safe_ids = [i for i, t in enumerate(texts) if texts.count(t) == 1 and t.strip()]
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def count(self, prompt: str) -> int:
        return sum(r["prompt"] == prompt for r in self.requests)

    # -- answers ------------------------------------------------------------------------------

    def answer_text(self, prompt: str, fault: str) -> str:
        m = re.search(r"what is (\d+) plus (\d+)", prompt)
        if m:
            n = int(m.group(1)) + int(m.group(2)) + (1 if fault == "wrong" else 0)
            return f"the answer is {n}"
        return "hello, i am fine"

    def logprobs(self, text: str, chat: bool) -> dict:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        rows = []
        for i in ids:
            alts = [a for a in self.safe_ids[:8] if a != i][:2]
            top = [
                (self.tok.decode([i]), -0.1),
                *[(self.tok.decode([a]), -3.0 - k) for k, a in enumerate(alts)],
            ]
            rows.append((self.tok.decode([i]), top))
        if chat:
            return {
                "content": [
                    {"token": t, "logprob": top[0][1], "bytes": list(t.encode()),
                     "top_logprobs": [{"token": a, "logprob": lp, "bytes": None} for a, lp in top]}
                    for t, top in rows
                ]
            }  # fmt: skip
        return {
            "tokens": [t for t, _ in rows],
            "token_logprobs": [top[0][1] for _, top in rows],
            "top_logprobs": [dict(top) for _, top in rows],
            "text_offset": [0] * len(rows),
        }

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict | None = None, length: int | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_POST(self) -> None:
                try:
                    self._answer()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (a timeout test)

            def _echo(self, ids: list[int], body: dict) -> None:
                """Completions with echo: log-probs of the given ids (the first has none), then one
                generated token. Top alternatives as in ``logprobs``; the given token gets -0.1 at
                even positions, and at odd ones sits outside the top (-5.0)."""
                with server.lock:
                    auth = self.headers.get("Authorization")
                    server.requests.append(
                        {
                            "prompt": ids,
                            "seed": None,
                            "fault": "ok",
                            "body": body,
                            "auth": auth,
                            "t": time.monotonic(),
                        }
                    )
                k = body.get("logprobs") or 0
                tokens, token_lps, tops = [], [], []
                by_id = body.get("return_tokens_as_token_ids")  # as vLLM: "token_id:N" for each token

                def name(i: int) -> str:
                    return f"token_id:{i}" if by_id else server.tok.decode([i])

                for t, i in enumerate([*ids, server.safe_ids[0]]):
                    piece = name(i)
                    alts = [a for a in server.safe_ids[:8] if a != i][:k]
                    top = {name(a): -2.0 - j for j, a in enumerate(alts)}
                    own = -0.1 if t % 2 == 0 else -5.0
                    if t % 2 == 0:
                        top = {piece: own, **dict(list(top.items())[: k - 1])}
                    tokens.append(piece)
                    token_lps.append(None if t == 0 else own)
                    tops.append(None if t == 0 else top)
                lp = {
                    "tokens": tokens,
                    "token_logprobs": token_lps,
                    "top_logprobs": tops,
                    "text_offset": [0] * len(tokens),
                }
                choice = {"index": 0, "finish_reason": "length", "text": "".join(tokens), "logprobs": lp}
                usage = {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
                resp = {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                        "choices": [choice], "usage": usage}  # fmt: skip
                self._send(200, json.dumps(resp).encode())

            def _answer(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                chat = self.path.endswith("/chat/completions")
                prompt = body["messages"][-1]["content"] if chat else body["prompt"]
                if isinstance(prompt, list):  # token ids, to be scored (echo)
                    self._echo(prompt, body)
                    return
                key = (prompt, body.get("seed"))
                with server.lock:
                    attempt = server.attempts.get(key, 0)
                    server.attempts[key] = attempt + 1
                    faults = server.plan.get(prompt, [])
                    fault = faults[attempt] if attempt < len(faults) else "ok"
                    server.requests.append({"prompt": prompt, "seed": body.get("seed"), "fault": fault,
                                            "auth": self.headers.get("Authorization"), "t": time.monotonic(),
                                            "body": body})  # fmt: skip
                if server.delay_s:
                    time.sleep(server.delay_s)
                if fault in ("429", "500", "503", "400"):
                    msg = {"error": {"message": f"injected {fault}", "type": "test"}}
                    if fault == "400":
                        msg["error"]["message"] = f"bad request from {self.headers.get('Authorization')}"
                    headers = {"Retry-After": str(server.retry_after)} if fault == "429" else {}
                    self._send(int(fault), json.dumps(msg).encode(), headers)
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "timeout":
                    time.sleep(server.hang_s)
                if fault == "malformed":
                    self._send(200, b'{"choices": [ {"mess')
                    self.close_connection = True
                    return
                text = server.answer_text(prompt, fault)
                finish = "stop"
                if fault == "length":
                    text, finish = text[: len(text) // 2], "length"
                choice = {"index": 0, "finish_reason": finish}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                top = body.get("top_logprobs") if chat else body.get("logprobs")
                if top and server.tok is not None:
                    choice["logprobs"] = server.logprobs(text, chat)
                n_completion = (
                    len(server.tok(text)["input_ids"]) if server.tok is not None else len(text.split())
                )
                resp = {
                    "id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                    "model": body["model"], "choices": [choice],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n_completion,
                              "total_tokens": len(prompt.split()) + n_completion},
                }  # fmt: skip
                data = json.dumps(resp).encode()
                if fault == "truncated":
                    self._send(200, data[: len(data) // 3], length=len(data))
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._send(200, data)

        return Handler
