#!/usr/bin/env bash
# The GPU checks, in one short run on one CUDA device (needs torch with CUDA, DeepSpeed, pydantic,
# and diffusers for the comparison; no Ray):
#   train    the DiT step's real training loop (DeepSpeed engine, bf16, ZeRO-2, NCCL process group,
#            fused AdamW, EMA, final checkpoint and export) on DiT-XL/2 at ImageNet-256 latent size:
#            images/s, MFU;
#   compare  latentflow's DiT against diffusers' DiTTransformer2DModel at the same size, bf16 autocast;
#   cascade  imagenet256.yaml's cascade sampled on the GPU: DiT-XL/2 base at 64 px, SR 64 -> 128 -> 256;
#   distill  the distill step's loops (progressive round 1, consistency distillation) at DiT-XL/2
#            size, bf16, ZeRO-2: images/s, MFU.
# Usage: bash benchmarks/gpu.sh [OUT_DIR [SECTION...]]   (default: all sections; log in OUT_DIR/gpu.log)
set -uo pipefail
out=${1:-.}
shift || true
sections=${*:-train compare cascade distill}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
quiet() { grep -v -E "^\s*train:|Warning|warn\("; }
{
  nvidia-smi -L
  $python -c 'import torch, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda, "deepspeed", deepspeed.__version__)'
  for section in $sections; do
    case $section in
      train)
        for batch in 64 128; do
          echo "== train loop: DiT-XL/2, 32x32x4 latents, batch $batch, bf16, ZeRO-2"
          timeout 240 $python benchmarks/dit_train_loop.py --preset DiT-XL/2 --latent-size 32 --batch "$batch" \
            --precision bf16 --zero-stage 2 --steps 60 --window 20 2>&1 | quiet
        done ;;
      compare)
        echo "== latentflow vs diffusers: DiT-XL/2 size, batch 64, bf16 autocast"
        timeout 180 $python benchmarks/dit_throughput.py --device cuda --dtype bf16 --batch 64 --depth 28 \
          --hidden 1152 --heads 16 --latent-size 32 --learn-sigma --warmup 3 --steps 5 --rounds 4 ;;
      cascade)
        echo "== cascade sampling: imagenet256 shapes, 16 images, bf16 autocast"
        timeout 240 $python benchmarks/cascade_sampling.py --preset imagenet --device cuda --dtype bf16 --images 16 ;;
      distill)
        echo "== distill loops: DiT-XL/2, 32x32x4 latents, batch 64, bf16, ZeRO-2"
        timeout 240 $python benchmarks/distill_train_loop.py --preset DiT-XL/2 --latent-size 32 --batch 64 \
          --precision bf16 --zero-stage 2 --steps 30 --window 10 2>&1 | quiet ;;
      *) echo "unknown section $section (train, compare, cascade, distill)" ;;
    esac
  done
} 2>&1 | tee "$out/gpu.log"
