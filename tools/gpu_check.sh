#!/usr/bin/env bash
# One prepared GPU session: correctness first (the gpu-marked tests), then the benchmarks, each
# bounded in time; tables are printed last and results land in benchmarks/results/.
# Usage on the GPU machine (torch, triton, transformers preinstalled): bash tools/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
status=0
timeout 240 python -m pytest -q -m gpu tests || status=1
# data parallel, 1 rank on nccl (multi-GPU runs stay unmeasured until a multi-GPU machine exists)
timeout 120 python -m torch.distributed.run --standalone --nproc-per-node 1 tools/examples/fsdp_grpo.py --steps 2 || status=1
timeout 120 python -m torch.distributed.run --standalone --nproc-per-node 1 tools/examples/fsdp_grpo.py --steps 2 --engine ddp || status=1
if [ "${1:-}" != "quick" ]; then
  timeout 300 python tools/bench_schedule.py --repeats 3 --attention auto padded || status=1
  timeout 150 python tools/bench_offload.py --repeats 2 || status=1
  [ -f tools/bench_attention.py ] && { timeout 180 python tools/bench_attention.py || status=1; }
  # tensor/context parallel over nccl needs one GPU per rank
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ "$gpus" -ge 2 ]; then
    timeout 300 python tools/bench_parallel.py --prompt 8193 --response 512 --group 8 \
      --hidden 1024 --heads 16 --kv-heads 4 --attention auto --write || status=1
  else
    echo "bench_parallel: skipped, needs 2 GPUs (found $gpus)"
  fi
fi
ls -l benchmarks/results/ 2>/dev/null
exit $status
