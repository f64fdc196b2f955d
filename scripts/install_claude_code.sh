#!/usr/bin/env bash
# Install Claude Code (npm @anthropic-ai/claude-code) at a pinned version, outside the
# repository, for the tests that run it unchanged against an Anthropic Messages server
# (tests/claude_code.py). Needs npm; the package ships a native binary, so Node's
# version does not matter once it is installed.
#
#   scripts/install_claude_code.sh         install unless present; print the binary's path
#   scripts/install_claude_code.sh --path  print the binary's path; exit 1 (installing
#                                          nothing) when it is not installed
#   LULL_CLAUDE_CODE_DIR=DIR               where it goes (default: the cache folder that
#                                          holds the tiny model, one folder per version)
#
# Re-running is cheap: a present binary that reports the pinned version is kept.
set -euo pipefail

version=2.1.332  # the version the offline switches in tests/claude_code.py were found on
dir="${LULL_CLAUDE_CODE_DIR:-${LULL_CACHE_DIR:-$HOME/.cache/lull}/claude-code-$version}"
bin="$dir/node_modules/.bin/claude"

installed() {
  [[ -x "$bin" ]] && [[ "$("$bin" --version 2>/dev/null)" == "$version "* ]]
}

if [[ "${1:-}" == "--path" ]]; then
  installed || { echo "install_claude_code: Claude Code $version is not installed in $dir" >&2; exit 1; }
  echo "$bin"
  exit 0
elif [[ $# -gt 0 ]]; then
  echo "install_claude_code: unknown argument '$1' (the only option is --path)" >&2
  exit 2
fi

if installed; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || {
  echo "install_claude_code: npm is missing: install Node.js and npm (apt-get install -y nodejs npm)" >&2
  exit 1
}
# Install beside the target, then rename: a run that dies half-way, or two runs at once,
# never leave a folder that looks installed.
tmp="$dir.tmp$$"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"
# The package declares node>=22 for its JavaScript fallback; the native binary it installs
# runs without Node, so an older Node's engine warning is not an error here.
npm install --prefix "$tmp" --no-fund --no-audit --loglevel=error \
  "@anthropic-ai/claude-code@$version" >&2
rm -rf "$dir"
mv "$tmp" "$dir"
installed || {
  echo "install_claude_code: npm installed $dir but $bin does not report version $version" \
       "(was the package's postinstall script, which places the native binary, skipped?)" >&2
  exit 1
}
echo "$bin"
