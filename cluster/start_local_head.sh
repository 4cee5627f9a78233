#!/usr/bin/env bash
# Start a Ray head on this machine and print the address the stages should use.
#   cluster/start_local_head.sh [NUM_CPUS]
#   export RAY_ADDRESS=127.0.0.1:6379 && dvc repro      # training stages join this cluster
#   ray stop                                           # when done
set -euo pipefail
num_cpus="${1:-$(nproc)}"
ray start --head --port=6379 --num-cpus="$num_cpus" --include-dashboard=false --disable-usage-stats
echo "export RAY_ADDRESS=127.0.0.1:6379"
