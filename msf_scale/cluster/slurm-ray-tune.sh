#!/bin/bash
# A Ray cluster inside one SLURM allocation, then a search on it (docs/TUNE.md):
#
#   sbatch cluster/slurm-ray-tune.sh --size base --variant msf_mamba_plus --num-samples 64 \
#       --set data.root=/shared/data/mine
#   sbatch --nodes 4 cluster/slurm-ray-tune.sh --size small --num-samples 32      # SBATCH lines can be overridden
#   sbatch cluster/slurm-ray-tune.sh --size small --num-samples 32 --resume       # continue an interrupted search
#
# The first node runs the Ray head and the Tune driver, every node (the first too) a Ray worker with its GPUs; each
# trial takes --gpus-per-trial 1 and --cpus-per-trial (CPUs per GPU) and runs train.py's training function. The
# arguments after the script go to `msf-scale tune` as they are. TUNE_STORAGE (default $PWD/runs/tune) must be on a
# filesystem every node mounts, as must the dataset. Set VENV to the environment with msf_scale[cuda,tune].
#SBATCH --job-name=msf-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one Ray node per host; Ray schedules the trials on its GPUs
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:INT@300           # five minutes before the time limit: Tune saves its state (then --resume)
set -euo pipefail

VENV=${VENV:-$PWD/.venv}
TUNE_STORAGE=${TUNE_STORAGE:-$PWD/runs/tune}
PORT=${RAY_PORT:-6379}
GPUS=${SLURM_GPUS_PER_NODE:-8}
GPUS=${GPUS##*:}                     # "h100:8" -> 8
CPUS=${SLURM_CPUS_PER_TASK:-64}
. "$VENV/bin/activate"

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
export RAY_ADDRESS="$head_ip:$PORT"
echo "Ray head $head ($RAY_ADDRESS), ${#nodes[@]} node(s) x $GPUS GPUs x $CPUS CPUs"

# --block keeps each srun step alive for as long as its Ray node runs
srun --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port="$PORT" \
    --num-cpus="$CPUS" --num-gpus="$GPUS" --include-dashboard=false --block &
sleep 20
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" ray start --address="$RAY_ADDRESS" \
        --num-cpus="$CPUS" --num-gpus="$GPUS" --block &
done
sleep 20
ray status || true

# the driver runs here (the batch step, on the head node); the trials run on every node's GPUs
status=0
msf-scale tune --address "$RAY_ADDRESS" --storage "$TUNE_STORAGE" --gpus-per-trial 1 \
    --cpus-per-trial $((CPUS / GPUS)) "$@" &
driver=$!
trap 'kill -INT $driver 2>/dev/null || true' INT TERM
wait $driver || status=$?
wait $driver 2>/dev/null || true     # a signal interrupts the first wait: let Tune save its state and exit

ray stop || true
exit $status
