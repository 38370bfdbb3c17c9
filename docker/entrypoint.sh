#!/bin/sh
# Container entry: the first argument selects the process; the rest go to it.
set -e
role=${1:-worker}
[ $# -gt 0 ] && shift
case "$role" in
  worker)    exec callq worker --loglevel "${CALLQ_LOG_LEVEL:-INFO}" "$@" ;;
  beat)      exec callq beat --loglevel "${CALLQ_LOG_LEVEL:-INFO}" "$@" ;;
  flower)    exec callq flower --address=0.0.0.0 --port="${FLOWER_PORT:-5555}" "$@" ;;
  webhooks)  exec callq webhooks --host 0.0.0.0 --port "${CALLQ_WEBHOOK_PORT:-8080}" "$@" ;;
  simulator) exec callq simulate-providers --host 0.0.0.0 --port "${SIM_PORT:-8765}" "$@" ;;
  migrate)   exec callq db upgrade "$@" ;;
  queue)     exec callq queue "$@" ;;
  metrics)   exec callq metrics --host 0.0.0.0 --port "${CALLQ_METRICS_PORT:-9108}" "$@" ;;
  providers) exec callq providers "$@" ;;
  demo)      exec callq demo "$@" ;;
  *)         exec "$role" "$@" ;;
esac
