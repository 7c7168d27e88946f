#!/usr/bin/env bash
# System packages the test suite needs (Debian). Idempotent; called by `make test`.
# - fonts-noto-cjk: CJK text rendering for training-data synthesis tests
# - chromium: the real-browser tests of the ComfyUI workflows
set -euo pipefail
need=()
fc-list 2>/dev/null | grep -qi "NotoSansCJK" || need+=(fonts-noto-cjk)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
