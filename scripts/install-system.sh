#!/usr/bin/env bash
# System packages the tests need: Debian's headless Chromium and its driver (browser tests of the web pages).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium/chromedriver missing: run 'sudo apt-get install -y chromium chromium-driver' (browser tests need them)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
