#!/usr/bin/env bash
# What one account's flood of admin calls costs another account: one
# account floods ListAuditEvents while another account's GetKey latency is
# sampled (`vilvik-keys-bench admin-flood`), once with the admin rate limit
# lifted and once with its defaults. Fails if the victim's calls failed or
# the flood got no call through. A fresh database vk_flood_<pid>, dropped
# at the end. Load goes to 127.0.0.1 only.
#
#   bash bench/admin-flood.sh                          # 10 s per phase
#   SIZE=tiny PROFILE=debug bash bench/admin-flood.sh  # 1 s per phase (CI)
#
# Knobs (environment), with their SIZE=tiny values in brackets; SIZE,
# PROFILE and PG_URL as bench/lib.sh says:
#   SECONDS_EACH=10   seconds of each phase (victim alone, under the flood) [1]
#   CONCURRENCY=32    flooding calls in flight
#   PORT=27170        the admin listener on 127.0.0.1 (verify on PORT+1)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
if tiny; then : "${SECONDS_EACH:=1}"; fi
SECONDS_EACH=${SECONDS_EACH:-10}
CONCURRENCY=${CONCURRENCY:-32}
PORT=${PORT:-27170}
postgres_node vk_flood
FLOOD_KEY=$(management_key FLOOD)
VICTIM_KEY=$(management_key VICTIM)
export FLOOD_KEY VICTIM_KEY
for mode in off on; do
    if [ "$mode" = off ]; then
        export VILVIK_KEYS_ADMIN_RATE_PER_SECOND=1000000 VILVIK_KEYS_ADMIN_RATE_BURST=1000000
    else
        unset VILVIK_KEYS_ADMIN_RATE_PER_SECOND VILVIK_KEYS_ADMIN_RATE_BURST
    fi
    "$BIN/vilvik-keys" serve --role admin &
    SERVER=$!
    wait_grpc "127.0.0.1:$PORT" "$SERVER"
    echo "== admin rate limit $mode"
    timeout $((SECONDS_EACH * 2 + 60)) "$BIN/vilvik-keys-bench" admin-flood \
        --admin "127.0.0.1:$PORT" --seconds "$SECONDS_EACH" --concurrency "$CONCURRENCY" \
        | tee "$TMP/flood-$mode.json"
    stop_pid "$SERVER"
    SERVER=
    jq -e '.victim_alone.get_key_calls > 0 and .victim_under_flood.get_key_calls > 0
           and .victim_alone.failures == {} and .victim_under_flood.failures == {}' \
        "$TMP/flood-$mode.json" >/dev/null || die "the victim's GetKey calls failed with the limit $mode"
    jq -e '.flood.admitted_per_s > 0' "$TMP/flood-$mode.json" >/dev/null \
        || die "no flooding call got through with the limit $mode"
done
