"""Run Claude Code (npm ``@anthropic-ai/claude-code``) unchanged, offline, against an
Anthropic Messages server: ``claude -p PROMPT --model NAME`` with ``ANTHROPIC_BASE_URL``.

``scripts/install_claude_code.sh`` owns the pinned version and where it is installed;
this module asks it for the binary. What Claude Code needs to run with no network but
the server under test (found on 2.1.332; each switch is said in ``offline_env``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

INSTALL_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_claude_code.sh"
# Every model alias Claude Code may pick on its own (side queries, sub-agents, the
# /model shortcuts). Each is pointed at the served model, so no request names a
# model the server does not serve.
MODEL_VARIABLES = (
    "ANTHROPIC_SMALL_FAST_MODEL",
    "ANTHROPIC_DEFAULT_HAIKU_MODEL",
    "ANTHROPIC_DEFAULT_SONNET_MODEL",
    "ANTHROPIC_DEFAULT_OPUS_MODEL",
    "CLAUDE_CODE_SUBAGENT_MODEL",
)
# Claude Code sends no temperature, so the server's defaults sample. The tiny model's
# random weights then write ~2,000 tokens on average before an end-of-sequence (seen:
# 98 to 6,672; ~100 s on two cores), and capping max_tokens is no way out: Claude Code
# fails a reply that stops at max_tokens. Greedy with a strong repetition penalty ends
# in ~100-300 tokens: each token written is penalised, and "</s>" never is. A server
# under test applies it as its generation defaults (vLLM's --override-generation-config).
SHORT_REPLIES = {"temperature": 0.0, "repetition_penalty": 20.0}


class ClaudeResult(NamedTuple):
    returncode: int  # 124 when the run was stopped at its timeout, as timeout(1) says
    stdout: str
    stderr: str
    seconds: float


def claude_binary() -> str | None:
    """The installed binary's path, or None when it is not installed (installs nothing)."""
    found = subprocess.run(["bash", str(INSTALL_SCRIPT), "--path"], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def offline_env(base_url: str, model: str, home: str, context_tokens: int, api_key: str = "x") -> dict[str, str]:
    """The whole environment of a run: nothing is inherited, so a developer's own
    ANTHROPIC_* settings, ~/.claude, or HTTP proxy cannot leak into the test."""
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    if not model:
        raise ValueError("model must be the served model name")
    if context_tokens <= 0:
        raise ValueError(f"context_tokens must be positive, got {context_tokens}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": home,  # its config (~/.claude.json, ~/.claude/) starts empty each run
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": api_key,  # with a key set, no login or OAuth is tried
        # No telemetry, error reporting, auto-update, MCP registry or /api/hello
        # connectivity check: each would otherwise try api.anthropic.com (ENOTFOUND here).
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        # The served name is unknown to Claude Code, which then assumes a 1 M-token window
        # and says so on stderr; the server's real window sizes its auto-compaction.
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(context_tokens),
    }
    env.update({name: model for name in MODEL_VARIABLES})
    return env


def run_claude(base_url: str, model: str, prompt: str = "say hello", *, context_tokens: int,
               timeout_s: float = 300.0, binary: str | None = None, api_key: str = "x") -> ClaudeResult:
    """``claude -p PROMPT --model MODEL`` against ``base_url``, in a fresh home and an
    empty working folder (no CLAUDE.md, no project settings). Permissions stay at their
    default (no --dangerously-skip-permissions): in -p mode a tool that needs permission
    is refused, so a tool call the model emits runs no command and edits no file."""
    if not prompt:
        raise ValueError("prompt must not be empty")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    binary = binary or claude_binary()
    if binary is None:
        raise FileNotFoundError(f"Claude Code is not installed: run {INSTALL_SCRIPT}")
    with tempfile.TemporaryDirectory(prefix="lull-claude-") as home:
        work = Path(home) / "work"
        work.mkdir()
        env = offline_env(base_url, model, home, context_tokens, api_key)
        return _run([binary, "-p", prompt, "--model", model], env, str(work), timeout_s)


def _run(argv: list[str], env: dict[str, str], cwd: str, timeout_s: float) -> ClaudeResult:
    start = time.monotonic()
    # Its own process group, so a timeout also stops whatever it started.
    process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
        return ClaudeResult(process.returncode, stdout, stderr, time.monotonic() - start)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return ClaudeResult(124, stdout, stderr + f"\n[run_claude: stopped after {timeout_s:.0f} s]",
                            time.monotonic() - start)
