#!/bin/sh
# Periodic model refresh for Docker Compose and single-machine installs: factors, then the
# CNN, every COFEAT_REFRESH_INTERVAL_S seconds. Kubernetes uses a CronJob instead
# (deploy/k8s/base/refresh-cronjob.yaml). A finished cycle touches the heartbeat file
# that `cofeat-healthcheck --heartbeat` reads; a failed step is logged and retried at
# the next cycle (the previous promoted versions keep serving).
set -u
interval="${COFEAT_REFRESH_INTERVAL_S:-3600}"
heartbeat_dir="${COFEAT_DATA_DIR:-/data}/refresh"
mkdir -p "$heartbeat_dir"
trap 'exit 0' TERM INT
while :; do
    started=$(date +%s)
    if cofeat refresh factors --once && cofeat refresh cnn --once; then
        touch "$heartbeat_dir/heartbeat"
    else
        echo "cofeat-refresh-loop: cycle failed (exit $?), retrying in ${interval}s" >&2
    fi
    elapsed=$(( $(date +%s) - started ))
    wait_s=$(( interval > elapsed ? interval - elapsed : 0 ))
    sleep "$wait_s" &
    wait $!
done
