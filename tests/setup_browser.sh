#!/usr/bin/env bash
# Installs headless Chromium (Debian's package) for the report's browser test, when it is missing.
# Needs root (CI runs as root). Without it the browser test skips with the reason.
set -u
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup_browser: could not install chromium; the browser test will skip" >&2
else
  echo "setup_browser: chromium missing and cannot apt-get install it; the browser test will skip" >&2
fi
exit 0
