"""`helm test lull`: the deployment answers as a user's client would. Lists the models
(the served one must be there, with its window) and makes one chat completion, through
the gateway Service, with the first API key of the release's Secret. Standard library
only; exits non-zero, saying why, on any failure. Prints no prompt or answer text."""

import json
import os
import sys
import urllib.error
import urllib.request

base, model = os.environ["LULL_URL"].rstrip("/"), os.environ["LULL_MODEL"]
lines = [line for line in open(os.environ["LULL_KEYS_FILE"]).read().splitlines() if line.strip()]
key = lines[0].split(":", 1)[1].strip() if lines else ""


def call(path, body=None):
    request = urllib.request.Request(base + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=float(os.environ.get("LULL_TIMEOUT_S", "600"))) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        sys.exit(f"lull test: {path} answered {error.code}: {error.read()[:500]!r}")
    except OSError as error:
        sys.exit(f"lull test: {path} did not answer ({error})")


served = {m["id"]: m for m in call("/v1/models").get("data", [])}
if model not in served:
    sys.exit(f"lull test: /v1/models lists {sorted(served)}, not {model!r}")
reply = call("/v1/chat/completions", {"model": model, "max_tokens": 8,
                                      "messages": [{"role": "user", "content": "Say hello."}]})
usage = reply.get("usage") or {}
if not reply.get("choices") or not usage.get("completion_tokens"):
    sys.exit(f"lull test: the chat completion came back without output (usage {usage})")
print(f"lull test: {model} is served (max_model_len {served[model].get('max_model_len')}); one chat completion: "
      f"{usage.get('prompt_tokens')} prompt tokens, {usage['completion_tokens']} output tokens")
