#!/usr/bin/env bash
# `ray job submit` to a Ray >= 2.52 cluster with token authentication (what genderrec's clusters run), e.g.
#   scripts/submit.sh --working-dir . -- python jobs/train_all.py --config configs/celeba_seed.yaml
#
# The Jobs CLI sends the cluster token only when RAY_AUTH_MODE=token is set on YOUR side; without it the dashboard
# answers "401 Unauthorized: Missing authentication token". This script sets it and finds the token, first found:
#   RAY_AUTH_TOKEN           the token itself
#   RAY_AUTH_TOKEN_PATH      a file holding it
#   RAYCLUSTER=<name>        a KubeRay cluster: the Secret <name> (key auth_token) in NAMESPACE (default: current)
#   ~/.ray/auth_token        Ray's default file: `ray get-auth-token --generate` writes it; cluster/aws-gpu.yaml
#                            mounts it on every node
# RAY_ADDRESS is the dashboard (default http://127.0.0.1:8265: `ray dashboard cluster/aws-gpu.yaml` or
# `kubectl port-forward svc/<name>-head-svc 8265:8265` forwards it there). RAY_AUTH_MODE=disabled skips all this.
set -euo pipefail

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"

fail() {
  echo "submit.sh: $*" >&2
  exit 2
}

if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    [[ -s "$RAY_AUTH_TOKEN_PATH" ]] || fail "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not a readable, non-empty file"
  elif [[ -n "${RAYCLUSTER:-}" ]]; then
    RAY_AUTH_TOKEN="$(kubectl get secret "$RAYCLUSTER" ${NAMESPACE:+--namespace "$NAMESPACE"} \
      --output 'jsonpath={.data.auth_token}' | base64 --decode)" ||
      fail "could not read the token of KubeRay cluster '$RAYCLUSTER' (kubectl get secret $RAYCLUSTER)"
    [[ -n "$RAY_AUTH_TOKEN" ]] || fail "the Secret '$RAYCLUSTER' has no auth_token (is authOptions.mode: token set?)"
    export RAY_AUTH_TOKEN
  elif [[ ! -s "$HOME/.ray/auth_token" ]]; then
    fail "no Ray auth token: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or RAYCLUSTER (KubeRay), or put the cluster's" \
      "token in ~/.ray/auth_token (a cluster without token auth: RAY_AUTH_MODE=disabled)"
  fi
fi

exec ray job submit "$@"
