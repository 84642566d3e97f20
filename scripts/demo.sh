#!/usr/bin/env bash
# The main job: two local nodes x two workers (and a hot spare each) train a small model on
# the Job API on CPU (gloo); worker rank 3 is killed mid-run (--fault); the spare takes its
# rank in place. Prints the recovery and its split from the job's events.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" examples/chaos_demo.py "$@"
