#!/usr/bin/env bash
# Write compose/.env and compose/*.env from their *.example files, once: every `change-me` becomes a
# fresh random hex secret, and OTPGATE_KEYS gets a new encryption key. Existing files are kept.
#
#   compose/init-env.sh [OTPGATE_CLI]     (`make compose-env`; OTPGATE_CLI defaults to .venv/bin/otpgate)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CLI="${1:-$HERE/../.venv/bin/otpgate}"
umask 077

for example in "$HERE"/.env.example "$HERE"/*.env.example; do
  target="${example%.example}"
  if [[ -e "$target" ]]; then
    echo "init-env: keeping $target"
    continue
  fi
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" == *=change-me ]]; then
      line="${line%change-me}$(openssl rand -hex 24)"
    elif [[ "$line" == OTPGATE_KEYS= ]]; then
      line="OTPGATE_KEYS=$("$CLI" keys generate --id "k$(date +%Y%m)")"
    fi
    printf '%s\n' "$line"
  done <"$example" >"$target"
  echo "init-env: wrote $target"
done
echo "init-env: review compose/*.env (Telegram api_id/hash and bot tokens, SMS provider, CAPTCHA secret)"
