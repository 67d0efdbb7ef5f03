#!/usr/bin/env bash
# One GPU session's measurements and checks in one command, sized to one device call (~9 minutes of an H100/H200
# after the machine starts), most important first:
#   compare-inference  Hiera-B inference, batch 256, bf16: fused + CUDA graphs vs timm + CUDA graphs (the strongest
#                      compiled peer), ViT-B/16 + CUDA graphs (the reference users compare with) and our fused=False
#                      model + CUDA graphs (the kernels' own share on top of compile)
#   compare-train      the Hiera-B MAE step, batch 128, bf16 autocast: hiera-optim's best mode (graph_safe=True +
#                      reduce-overhead, static mask buffers) vs fused + CUDA graphs (+ fused=False and ViT-B/16's
#                      supervised step with CUDA graphs, if the limit leaves time)
#   profile            GPU time per kind (and per stage for an eager run) beside the roofline's floors, and MFU:
#                      inference (fused + CUDA graphs, timm + CUDA graphs), then the MAE step (fused + CUDA graphs);
#                      inductor's on-disk cache makes these compiles cheap after the compare steps
#   gpu-tests          the CUDA lane: tests/test_gpu.py (bf16 first, inductor, CUDA graphs, determinism) and every
#                      kernel sweep on CUDA (SAM 2's window kernels included), over pytest-xdist workers
#   sam2               SAM 2.1 base_plus's trunk at 1024², bf16, batch 1 and 8: the official code (timm's copy, and
#                      the sam2 package when carried) eager and compiled vs hiera_fast.patch, eager and compiled; runs
#                      in what the budget has left after the steps above (a second call: STEPS="sam2 sam2-calls")
# More steps, for a session that asks for them with STEPS: sam2-calls (each SAM 2 windowed attention call, fused vs the
# official pad/partition/SDPA/unpartition, bf16), sam2-autotune (the trunk rows under max-autotune: minutes of
# compile), sam2-sizes (tiny / small / large trunk rows), gpu-tests-rest (the rest of tests/ on CUDA), bench-ops
# (per attention call, bf16), bench-models / bench-train (the full suites' eager and compiled rows), profile-host
# (benchmarks/profile_train.py: host vs GPU time of eager-mode steps).
#
#   bash benchmarks/gpu_session.sh OUT_DIR          # on the GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_session.sh /tmp/x   # anywhere: the same steps at toy sizes (--bench-smoke)
#
# STEPS (default "compare-inference compare-train profile profile-train gpu-tests sam2") picks and orders the steps; LIMIT_<STEP>
# (LIMIT_COMPARE_INFERENCE, LIMIT_COMPARE_TRAIN, LIMIT_PROFILE, LIMIT_PROFILE_TRAIN, LIMIT_GPU_TESTS, ...) overrides a
# step's limit, TESTS_K the -k of the GPU tests. BUDGET (seconds, default 565) bounds the whole script; each step is
# cut to what is left. A step that overruns is interrupted with SIGINT, so pytest still writes the JSON of what it
# measured (the case it cut is left out), and the next step runs. Writes at most 8 files into OUT_DIR (the device tool
# brings back 8): session.log (every step's output, exit code and seconds), models.json, train.json (pytest-benchmark)
# and models.md, train.md (python -m benchmarks.report), profile.md, profile-train.md, sam2.json. Exit code: the number of
# failed steps; 100 + that when the session stopped early (the install failed, or fused=True would not reach the
# Triton kernels on CUDA, as the fused-backend step shows: then no measurement would mean anything).
#
# The step limits are estimates: the H100 of 2026-11-28 compiled Hiera-B's MAE step with CUDA graphs in ~60-80 s and
# its GPU tests took ~195 s without xdist. TORCHINDUCTOR_COMPILE_THREADS uses the machine's cores.
#
# Peers that are not in the GPU image (hiera-transformer for `official`, hiera-optim; both pure Python, their needs
# are in the image) travel as wheels in .whl/ (ignored by git): when .whl/ holds wheels they are installed into
# /tmp/site first. In this workplace, from the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl hiera-transformer==0.1.4 hiera-optim==0.2.1
#   device run: command "bash benchmarks/gpu_session.sh $OUT", carry [".whl"], timeout_s 600 (a step
#   interrupted at its limit may take a few seconds more to stop; SIGKILL comes 30 s after SIGINT)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash benchmarks/gpu_session.sh OUT_DIR}
mkdir -p "$out"
log="$out/session.log"
: >"$log"
failed=0
python=${PYTHON:-python3}
smoke=()
[ "${SMOKE:-0}" != "0" ] && smoke=(--bench-smoke)

deadline=$(($(date +%s) + ${BUDGET:-565}))  # the whole script: one device call is at most 600 s

step() {  # step NAME SECONDS COMMAND...: run with a time limit (cut to what the budget has left), log its output
    local name=$1 limit=$2 start rc left
    shift 2
    start=$(date +%s)
    left=$((deadline - start - ${RESERVE:-0}))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: skipped, the time budget is spent" | tee -a "$log"
        failed=$((failed + 1))
        return 1
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --signal=INT --kill-after=30 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    return "$rc"
}

stop() {  # stop WHY: end the session now (no measured step would mean anything), exit code 100 + failed steps
    echo "=== stopping: $1" | tee -a "$log"
    exit $((100 + failed))
}

export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    step wheels 120 "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# always (a few seconds): from the repository root `import hiera_fast` finds the source folder even when the package
# is not installed, but `hiera_fast.kernels` (kernels/) only exists for an installed one
step install 180 "$python" -m pip install -q --no-deps --no-build-isolation -e . ||
    stop "the install failed, so hiera_fast.kernels cannot be imported"
step info 60 "$python" -m hiera_fast info
command -v nvidia-smi >/dev/null && step nvidia-smi 30 nvidia-smi
# on a GPU machine, every fused case needs the Triton kernels on CUDA: without them each would skip, and the session
# would spend its minutes on baselines alone
if [ "${SMOKE:-0}" = "0" ]; then
    step fused-backend 60 "$python" -c "from hiera_fast import ops; backend, why = ops.fused_backend('cuda'); \
print('fused=True on cuda:', backend, '-', why); raise SystemExit(backend != 'triton')" ||
        stop "fused=True would not run the Triton kernels on this machine (see fused-backend above)"
fi

# most important first; RESERVE keeps time for the reports at the end (about 1 s each)
export RESERVE=10
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
pytest=("$python" -m pytest -q -p no:cacheprovider -o addopts="-ra")
# pytest-xdist (in the GPU image): the tests' Triton JIT compiles spread over the machine's cores
xdist=()
[ "${SMOKE:-0}" = "0" ] && "$python" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-12}")
model=hiera_base_224 batch=256 mae=mae_hiera_base_224 mae_batch=128 profile_dev=()
if [ "${SMOKE:-0}" != "0" ]; then
    model=hiera_tiny_224 batch=1 mae=mae_hiera_tiny_224 mae_batch=1
    command -v nvidia-smi >/dev/null || profile_dev=(--device cpu)
fi
steps=" ${STEPS:-compare-inference compare-train profile profile-train gpu-tests sam2} "  # STEPS picks (and orders) the steps
for name in $steps; do
    case $name in
    compare-inference)
        step compare-inference "${LIMIT_COMPARE_INFERENCE:-150}" "${pytest[@]}" benchmarks/test_bench_models.py \
            "${smoke[@]}" -k "$model-b$batch and (timm+cudagraphs or fused+cudagraphs or vit+cudagraphs or \
eager+cudagraphs)" --benchmark-json="$out/models.json" ;;
    compare-train)
        step compare-train "${LIMIT_COMPARE_TRAIN:-130}" "${pytest[@]}" benchmarks/test_bench_train.py "${smoke[@]}" \
            -k "hiera-optim+cudagraphs or fused+cudagraphs or eager+cudagraphs or vit+cudagraphs" \
            --benchmark-json="$out/train.json" ;;
    profile)
        step profile "${LIMIT_PROFILE:-60}" "$python" -m benchmarks.profile_gpu --model "$model" --batch "$batch" \
            --impl fused+cudagraphs timm+cudagraphs "${profile_dev[@]}" --out "$out" --name profile --no-plot ;;
    profile-train)
        step profile-train "${LIMIT_PROFILE_TRAIN:-45}" "$python" -m benchmarks.profile_gpu --model "$mae" \
            --batch "$mae_batch" --train --impl fused+cudagraphs "${profile_dev[@]}" --out "$out" \
            --name profile-train --no-plot ;;
    profile-host)  # where an eager-mode MAE training step's time goes (host vs GPU), eager vs fused: session.log
        profile_args=(--name "$mae" --batch "$mae_batch" --impl eager fused)
        [ "${SMOKE:-0}" != "0" ] && profile_args+=(--device cpu --mock-kernels --rounds 2 --steps-per-round 1)
        step profile-host "${LIMIT_PROFILE_HOST:-60}" "$python" -m benchmarks.profile_train "${profile_args[@]}" ;;
    gpu-tests)  # the CUDA lane: tests/test_gpu.py and every kernel sweep on CUDA (bf16 first), over xdist workers
        step gpu-tests "${LIMIT_GPU_TESTS:-130}" "${pytest[@]}" "${xdist[@]}" tests/test_gpu.py \
            tests/test_kernels_fwd.py tests/test_kernels_bwd.py tests/test_kernels_windows.py \
            -k "${TESTS_K:-not compile_lane}" ;;
    sam2)  # SAM 2.1 base_plus trunk at 1024², bf16: official / patched, eager and torch.compile (default mode)
        step sam2 "${LIMIT_SAM2:-120}" "${pytest[@]}" benchmarks/test_bench_sam2.py "${smoke[@]}" \
            -k "test_sam2_trunk and base_plus and not max-autotune" --benchmark-json="$out/sam2.json" ;;
    sam2-calls)
        step sam2-calls "${LIMIT_SAM2_CALLS:-90}" "${pytest[@]}" benchmarks/test_bench_sam2.py "${smoke[@]}" \
            -k "test_sam2_window_call or test_sam2_set_image" --benchmark-json="$out/sam2-calls.json" ;;
    sam2-autotune)
        step sam2-autotune "${LIMIT_SAM2_AUTOTUNE:-300}" "${pytest[@]}" benchmarks/test_bench_sam2.py "${smoke[@]}" \
            -k "test_sam2_trunk and base_plus and b1 and max-autotune" --benchmark-json="$out/sam2-autotune.json" ;;
    sam2-sizes)
        step sam2-sizes "${LIMIT_SAM2_SIZES:-240}" "${pytest[@]}" benchmarks/test_bench_sam2.py "${smoke[@]}" \
            -k "test_sam2_trunk and not base_plus and not max-autotune" --benchmark-json="$out/sam2-sizes.json" ;;
    gpu-tests-rest)  # the rest of tests/ on CUDA: fused models, training, patch, CUDA graphs, dispatch, parity
        step gpu-tests-rest "${LIMIT_GPU_TESTS_REST:-120}" "${pytest[@]}" "${xdist[@]}" tests \
            --ignore=tests/test_gpu.py --ignore=tests/test_kernels_fwd.py --ignore=tests/test_kernels_bwd.py \
            --ignore=tests/test_kernels_compile.py -k "${TESTS_K:-not compile_lane}" ;;
    bench-train)
        step bench-train "${LIMIT_BENCH_TRAIN:-190}" "${pytest[@]}" benchmarks/test_bench_train.py "${smoke[@]}" \
            -k "${TRAIN_K:-not max-autotune}" --benchmark-json="$out/train.json" ;;
    bench-ops)
        step bench-ops "${LIMIT_BENCH_OPS:-75}" "${pytest[@]}" benchmarks/test_bench_ops.py "${smoke[@]}" \
            -k "(bf16 or fp32) and not flex" --benchmark-json="$out/ops.json" ;;
    bench-models)
        step bench-models "${LIMIT_BENCH_MODELS:-120}" "${pytest[@]}" benchmarks/test_bench_models.py "${smoke[@]}" \
            -k "$model-b$batch" --benchmark-json="$out/models.json" ;;
    *) echo "=== unknown step $name" | tee -a "$log"; failed=$((failed + 1)) ;;
    esac
done
export RESERVE=0
for json in "$out"/ops.json "$out"/train.json "$out"/models.json; do  # sam2*.json: their rows are read as JSON
    [ -s "$json" ] && step "report-$(basename "$json" .json)" 60 "$python" -m benchmarks.report "$json" --out "$out" \
        --no-plot
done
echo "=== done: $failed step(s) failed" | tee -a "$log"
exit "$failed"
