#!/usr/bin/env bash
# The device check for the CUDA work (issue 19), run on a machine with an NVIDIA GPU, its
# driver and toolkit, but no Rust toolchain. Build here first, in the repository root:
#
#   cargo build --release && cargo test --release --workspace --no-run
#
# then carry target/release (the binary and target/release/deps/*) to the GPU machine and run
#
#   bench/gpu_check.sh [--llama-cpp DIR_WITH_LLAMA_CPP_SOURCE] [--model FILE.gguf]
#
# (AGENTD_TARGET=target/debug points it at a debug build instead.) A test that printed SKIPPED
# found no driver or device: on the GPU machine that means the check did not happen.
#
# It prints one JSON object on stdout (progress on stderr):
# - the GPU (nvidia-smi) and what `agentd device` finds (driver, NVRTC, devices) after
#   compiling every kernel source for the device's architecture;
# - the GPU kernel tests (daemon/cuda/tests/gpu_kernels.rs: every kernel against its CPU twin),
#   each test's outcome;
# - the CUDA executor's benchmarks (`agentd bench engine --device cuda`, `agentd bench prefix
#   --device cuda --sessions 64`) when the binary has `--device` (not built yet: reported as
#   absent);
# - with --llama-cpp DIR: llama.cpp built there with CMake and nvcc (GGML_CUDA=ON), and its
#   llama-bench on the same GGUF file, for the ratios.
set -uo pipefail
cd "$(dirname "$0")/.."

LLAMA_SRC=""
MODEL=""
while [ $# -gt 0 ]; do
    case "$1" in
        --llama-cpp) LLAMA_SRC="$2"; shift 2 ;;
        --model) MODEL="$2"; shift 2 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

TARGET=${AGENTD_TARGET:-target/release}
AGENTD=$TARGET/agentd
log() { echo "gpu_check: $*" >&2; }
json_str() { python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }

# The NVRTC of the toolkit, for the tests and the daemon.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
log "GPU: $gpu"

device="null"
if [ -x "$AGENTD" ] && "$AGENTD" device --help >/dev/null 2>&1; then
    device=$("$AGENTD" device --json 2>/dev/null || echo null)
fi

# The GPU kernel tests: every test executable built from daemon/cuda's tests.
tests_json="["
sep=""
for t in "$TARGET"/deps/gpu_kernels-*; do
    [ -x "$t" ] && [ -f "$t" ] || continue
    log "running $t"
    out=$("$t" --test-threads 1 --nocapture 2>&1)
    rc=$?
    skipped=$(grep -c SKIPPED <<<"$out")
    passed=$(grep -oE 'test result: .* ([0-9]+) passed' <<<"$out" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
    failed=$(grep -oE '[0-9]+ failed' <<<"$out" | tail -1 | grep -oE '[0-9]+' || echo 0)
    tail=$(tail -c 4000 <<<"$out" | json_str)
    tests_json+="$sep{\"binary\":\"$t\",\"rc\":$rc,\"passed\":$passed,\"failed\":$failed,\"skipped\":$skipped,\"tail\":$tail}"
    sep=","
done
tests_json+="]"

executor="\"absent: this agentd has no --device flag (the CUDA executor is not built yet)\""
if [ -x "$AGENTD" ] && "$AGENTD" --help 2>&1 | grep -q -- '--device'; then
    model_args=()
    [ -n "$MODEL" ] && model_args=(--model "$MODEL")
    engine=$("$AGENTD" "${model_args[@]}" --device cuda bench engine 2>/dev/null || echo null)
    prefix=$("$AGENTD" "${model_args[@]}" --device cuda bench prefix --sessions 64 2>/dev/null || echo null)
    executor="{\"engine\":$engine,\"prefix\":$prefix}"
fi

llama="null"
if [ -n "$LLAMA_SRC" ] && command -v cmake >/dev/null && command -v nvcc >/dev/null; then
    log "building llama.cpp with CUDA in $LLAMA_SRC/build-cuda"
    if cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/build-cuda" -DGGML_CUDA=ON -DLLAMA_CURL=OFF \
        -DCMAKE_BUILD_TYPE=Release >&2 && cmake --build "$LLAMA_SRC/build-cuda" -j --target llama-bench >&2; then
        model="$MODEL"
        [ -z "$model" ] && model=$("$AGENTD" model path 2>/dev/null)
        llama=$("$LLAMA_SRC/build-cuda/bin/llama-bench" -m "$model" -ngl 99 -p 512 -n 128 -o json 2>/dev/null || echo null)
    fi
fi

printf '{"gpu":%s,"device":%s,"kernel_tests":%s,"executor":%s,"llama_cpp":%s}\n' \
    "$(json_str <<<"$gpu")" "$device" "$tests_json" "$executor" "$llama"
