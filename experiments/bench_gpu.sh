#!/usr/bin/env bash
# The prepared accelerator check of the round benchmark (issue 6), one command for a session
# that is lent a GPU:  OUT=/some/dir bash experiments/bench_gpu.sh
# (the device tool's $OUT; default experiments/results). Every package the benchmarks need is
# in the GPU image (jax, flax, optax, chex, orbax, scikit-learn, tqdm); they read no dataset.
# The notebook check needs Jupyter wheels carried in .whl/ (experiments/gpu_notebook.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-experiments/results}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# issue 19: the quickstart notebook, unchanged, in a Jupyter kernel on the GPU (~1 min; the
# Jupyter wheels travel in .whl/: run `bash experiments/gpu_notebook.sh download` here first
# and carry .whl). A failure here is reported and does not stop the benchmarks.
OUT="$OUT/notebook_gpu" bash experiments/gpu_notebook.sh || echo "gpu_notebook.sh failed (rc $?)"
# speedup vs the sequential per-client loop (goal on a GPU: >= 10x on pfl_cifar10)
python experiments/bench_round.py --workload pfl_cifar10 --rounds 20 --json "$OUT/bench_round_pfl_cifar10_gpu.json"
# the full 1,500-round pfl-research CIFAR-10 benchmark, jaxfl only (goal: < 60 s in total)
python experiments/bench_round.py --workload pfl_cifar10 --rounds 1500 --skip-sequential \
  --json "$OUT/bench_round_pfl_cifar10_gpu_1500.json"
python experiments/bench_round.py --workload digits --cohort 100 --rounds 20 --json "$OUT/bench_round_digits_c100_gpu.json"
python experiments/bench_round.py --workload pfl_cifar10 --rounds 20 --mode map --skip-sequential \
  --json "$OUT/bench_round_pfl_cifar10_gpu_map.json"
# Paper-scale experiments (one command each; minutes to hours on a GPU, not part of the
# 15-minute device check): multi-metric client activation on CIFAR-10 / ResNet-20 (TFDS
# cifar10 must be prepared under ~/tensorflow_datasets; the GPU image has no TFDS: carry it).
# python experiments/client_activation.py --preset cifar10_resnet20
# Converged layer-wise comparison (issue 16) in FedLUAR's CIFAR-10 / ResNet-20 setting (tau'
# 20, 200 rounds, delta 12, LR grid 0.1/0.2/0.4, 3 seeds: 12 regime + 50 main pieces, 9 of
# them copies; an estimated 2-5 min each on an H200 from bench_round's achieved FLOP rate, not
# measured). Resumable: seed $OUT with the pieces already done (they travel in the working
# tree), run for a few minutes per device call, bring the new pieces back from $OUT. Same TFDS
# requirement as above:
# cp -r experiments/results/layerwise_converged "$OUT"/ 2>/dev/null || true
# python experiments/layerwise_converged.py --preset cifar10_resnet20 --regime-sweep \
#   --data-dir ~/tensorflow_datasets --out-dir "$OUT" --max-minutes 5
# python experiments/layerwise_converged.py --preset cifar10_resnet20 \
#   --data-dir ~/tensorflow_datasets --out-dir "$OUT" --max-minutes 5
# mL-BFGS vs SGD / AdamW / K-FAC (issue 17) at paper scale: ResNet-20 on CIFAR-10 (TFDS as above),
# 100 epochs, T = 50, beta = 0.999, and the data-parallel large-batch CNN on the host's devices;
# 7 optimizers x 6 LRs + 2 seeds x 7 = 56 pieces per workload, resumable like the layer-wise
# study (seed $OUT with the pieces done, bring $OUT/mlbfgs back). K-FAC needs kfac-jax (+ distrax,
# tfp-nightly; the `bench` extra), which the GPU image lacks: carry the wheels or add
# `--optimizers adamw sgd mlbfgs mlbfgs_blocks nsgd`.
# cp -r experiments/results/mlbfgs "$OUT"/ 2>/dev/null || true
# python experiments/mlbfgs_benchmark.py --workloads cifar10_resnet20 dp_cnn \
#   --data-dir ~/tensorflow_datasets --out-dir "$OUT" --max-minutes 8
# PriSM (issue 15) in the paper's heterogeneous CIFAR-10 / ResNet-18 setting (1000 rounds,
# E = 2, kappa_i from {0.2, 0.4, 0.6}; CIFAR-10 as an .npz since the image has no TFDS):
# python experiments/prism.py --preset cifar10_resnet18 --data-npz cifar10_all.npz \
#   --arms full prism_power prism_uniform static_width prism_hetero --seeds 0 --out-dir "$OUT"
# GEM on a pre-trained transformer (issue 21): the same study at a longer fine-tuning budget
# (the CPU run is 60 steps of batch 16 at 32 tokens); needs the text extra + fortunes files:
# python experiments/gem_text.py --steps 600 --max-len 64 --batch 32 --out-dir "$OUT"
# Federated GEM vs random masks vs dense FedAvg at a larger scale (100 clients, 10 per round,
# 8 local steps, 200 rounds, the whole test split; 3 arms x 3 rates + 2 seeds, resumable):
# python experiments/gem_fed.py --preset minilm_fortunes_long --out-dir "$OUT" --max-minutes 8
# EmbracingFL (ALGORITHMS.md §8b) in the same CIFAR-10 / ResNet-18 setting (dense model; weak /
# moderate / strong clients train 3/7, 5/7 and all of the modules from the output side; the
# `full` arm is PriSM's when its pieces are in $OUT):
# python experiments/embracing.py --preset cifar10_resnet18 --data-npz cifar10_all.npz \
#   --arms full embracing strong_only heterofl fjord --seeds 0 --out-dir "$OUT"
# Layer-wise SAM (ALGORITHMS.md §9) vs SGD and SAM, centralized, on CIFAR-10 / ResNet-20 (TFDS
# as above; 100 epochs, batch 128; 4 arms x 3-point grid + 2 seeds = 20 pieces, resumable like
# the studies above: seed $OUT with experiments/results/layerwise_sam, bring it back):
# cp -r experiments/results/layerwise_sam "$OUT"/ 2>/dev/null || true
# python experiments/layerwise_sam.py --workload cifar10_resnet20 \
#   --data-dir ~/tensorflow_datasets --out-dir "$OUT" --max-minutes 8
# Partial model averaging (ALGORITHMS.md §8a) at the paper's scale: 128 workers, all training
# every round, CIFAR-10 / ResNet-20 (TFDS as above), tau = 16 = 4 groups x 4 steps, 8,000 local
# steps; FedAvg(tau), PMA and FedAvg(tau/4) x 3 LRs + 2 seeds (15 pieces, resumable as above):
# cp -r experiments/results/pma "$OUT"/ 2>/dev/null || true
# python experiments/pma.py --preset cifar10_resnet20 --data-dir ~/tensorflow_datasets \
#   --out-dir "$OUT" --max-minutes 8
# Hessian-aware learning rate (ALGORITHMS.md §10a) at the paper's setting: CIFAR-10 / ResNet-20
# (TFDS as above), 200 epochs, batch 128 vs 16,384; small / large_step / large_cosine /
# large_hessian x 6-point LR grid + 2 seeds at each arm's 2 best (40 pieces, resumable as above):
# cp -r experiments/results/hessian_lr "$OUT"/ 2>/dev/null || true
# python experiments/hessian_lr.py --preset cifar10_resnet20 --data-dir ~/tensorflow_datasets \
#   --out-dir "$OUT" --max-minutes 8
# FedMut (a FedLUAR baseline) vs FedAvg nearer the paper's setting: CIFAR-10 (TFDS as above),
# 100 clients (Dirichlet 0.1), 10 per round, 50 local steps of 50, 1,000 rounds, ResNet-20;
# 2 arms x 6-point LR grid + 2 seeds at each arm's 2 best (20 pieces, resumable as above):
# cp -r experiments/results/fedmut "$OUT"/ 2>/dev/null || true
# python experiments/fedmut.py --preset cifar10_resnet20 --data-dir ~/tensorflow_datasets \
#   --out-dir "$OUT" --max-minutes 8
