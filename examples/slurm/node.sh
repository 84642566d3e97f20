#!/bin/bash
# One node's agent of an elastictrain job under Slurm, run by srun on every node of the
# allocation (see etrain.sbatch for the knobs). The agent is this task's process: Slurm's
# --signal reaches it, and a SIGTERM drains the node.
set -euo pipefail
exec etrain launch \
  --nnodes "${ETRAIN_MIN_NODES:-1}:${SLURM_NNODES}" \
  --nproc-per-node "${ETRAIN_NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}" \
  --max-restarts "${ETRAIN_MAX_RESTARTS:-3}" \
  --job-id "slurm-${SLURM_JOB_ID}" \
  --node-id "${SLURMD_NODENAME}" \
  --local-addr "${ETRAIN_LOCAL_ADDR:-$(hostname -i | awk '{print $1}')}" \
  --etcd "${ETRAIN_ETCD}" \
  --credentials "${ETRAIN_SHARED}/credentials" \
  --drain-timeout "${ETRAIN_DRAIN_TIMEOUT:-90}" \
  ${ETRAIN_LAUNCH_ARGS:-} \
  "$@"
