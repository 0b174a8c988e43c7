"""Local HTTP servers standing in for vLLM's OpenAI-compatible server: one that replays a recorded answer (intact
or broken), and one that answers as vLLM does from a model in this process (``vllm_responder``).

The recording (tests/data/vllm_prompt_logprobs.json) is a real answer of vLLM 0.32 (CPU build) serving
SmolLM2-135M-Instruct to ``POST /v1/completions`` with ``prompt_logprobs=5``.
"""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

RECORDING = json.loads((Path(__file__).parent / "data" / "vllm_prompt_logprobs.json").read_text())


class FakeServer:
    """Answers each request with the next (status, body) of ``answers`` (the last one repeats) and records it;
    ``respond(path, payload) -> (status, body)``, when given, answers instead."""

    def __init__(self, respond=None):
        self.answers: list[tuple[int, object]] = [(200, RECORDING["response"])]
        self.respond = respond
        self.requests: list[tuple[str, dict | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, payload):
                fake.requests.append((self.path, payload))
                if fake.respond is not None:
                    status, body = fake.respond(self.path, payload)
                else:
                    status, body = fake.answers.pop(0) if len(fake.answers) > 1 else fake.answers[0]
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()


def vllm_responder(model, tokenizer, name: str = "teacher"):
    """``respond`` for ``FakeServer``: /v1/models, /tokenize and /v1/completions answered as vLLM 0.32 answers them
    (the recording's layout: ``prompt_logprobs`` None at position 0, then the top-k by id with log-probability and
    1-based rank, plus the prompt token with its rank when outside them), from ``model``'s log-softmax in float32."""

    def respond(path: str, payload: dict | None):
        if path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": name, "root": name, "object": "model"}]}
        if path == "/tokenize":
            return 200, {"tokens": tokenizer(payload["prompt"], add_special_tokens=False)["input_ids"]}
        k, choices = payload["prompt_logprobs"], []
        for j, ids in enumerate(payload["prompt"]):
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            positions = [None]
            for t in range(1, len(ids)):
                row = logprobs[t - 1]
                order = row.argsort(descending=True)
                ranks = torch.empty_like(order)
                ranks[order] = torch.arange(1, len(order) + 1)
                entries = {str(int(i)): {"logprob": float(row[i]), "rank": int(ranks[i])} for i in order[:k]}
                entries.setdefault(str(ids[t]), {"logprob": float(row[ids[t]]), "rank": int(ranks[ids[t]])})
                positions.append(entries)
            choices.append({"index": j, "text": "", "prompt_logprobs": positions})
        return 200, {"object": "text_completion", "model": name, "choices": choices}

    return respond
