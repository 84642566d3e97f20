#!/usr/bin/env bash
# The main job: two local nodes x two workers train a small model with DDP on CPU (gloo)
# through the embedded etcd; one worker is killed mid-run by `etrain chaos kill`; the job
# recovers and finishes. Prints the recovery as the agents saw it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" examples/chaos_demo.py "$@"
