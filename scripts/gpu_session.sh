#!/usr/bin/env bash
# The GPU checks and measurements, in named stages of at most ~10 minutes each: every stage writes
# into one folder that is packed into $OUT/<stage>.tar.gz (OUT: where results go, default
# /tmp/gpu_session), and a line per stage goes to $OUT/summary.txt.
#
#   bash scripts/gpu_session.sh tests probe         # ~4 min: pytest -m cuda, the newcomer probe
#   bash scripts/gpu_session.sh kernels bench       # ~7 min: kernel counts, the decoder bench
#   bash scripts/gpu_session.sh attention warm      # ~3 min: attention op's host cost, warm start
#   bash scripts/gpu_session.sh direct              # ~2.5 min: the bench with skip_guard_check=1
#   bash scripts/gpu_session.sh memory              # ~1 min: the piecewise pool's growth per capture
#   bash scripts/gpu_session.sh warmref setup       # ~4 min: warm start of the bench's decoder, cold setup per mode
#   bash scripts/gpu_session.sh warmsetup           # ~1.5 min: piecewise's setup, cold then warm, profiled (where a warm start goes)
#   bash scripts/gpu_session.sh profile             # ~2 min: host time, GPU busy/idle per call (bench.profile_decode)
#   bash scripts/gpu_session.sh bench packed        # ~6 min: the bench with the reference op, then with --attention packed
#   AB_OPTION=skip_module_guards=1 bash scripts/gpu_session.sh abopt   # ~7 min: the option off/on/off/on, a process each
#                                                   # (AB_OPTION=backed_compile=0 replaces the old 'ab' stage)
#   bash scripts/gpu_session.sh layers              # ~1.5 min: a full-decode call's host time, layer by layer (scripts/host_layers.py)
#   bash scripts/gpu_session.sh gpuside             # ~2 min: each call's GPU-alone span vs its latency (scripts/gpu_side.py)
#   bash scripts/gpu_session.sh precompile          # ~4 min: warm start of the bench's decoder, plain vs Dynamo's AOT artifact
#   bash scripts/gpu_session.sh mixed moe           # ~7 min: bench.mixed (every call a new T, cache in buffers), bench.moe
#   bash scripts/gpu_session.sh mixedprofile        # ~3 min: BufferDecoder's op host/GPU µs per SDPA order, direct_ops on/off
#   bash scripts/gpu_session.sh generate            # ~8 min: bench.generate (1B Llama, prompt 128): decode tokens/s, first token, varied prompts
#
# Run from the repository root, with pytest-xdist importable (on a machine without a package index:
# its wheels installed to a folder on PYTHONPATH) and the repository on PYTHONPATH.
# Stages: tests, probe, kernels, bench, direct, abopt, layers, gpuside, attention, memory, warm, warmref, setup, warmsetup, profile, packed, precompile, mixed, mixedprofile, moe, generate. BENCH_COMMIT names the commit in the
# records (the device copy's .git may be stale); default: git rev-parse --short HEAD.
set -u
out=${OUT:-/tmp/gpu_session}
mkdir -p "$out"
export BENCH_COMMIT=${BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export PYTHONUNBUFFERED=1

run_stage() {
    local stage=$1 dir
    dir=$(mktemp -d)
    local started=$SECONDS code=0
    case $stage in
        tests)
            timeout ${TESTS_TIMEOUT:-300} python -m pytest -m cuda -n 8 -q -p no:cacheprovider > "$dir/cuda-tests.log" 2>&1; code=$?
            tail -1 "$dir/cuda-tests.log" > "$dir/line" ;;
        probe)
            (cd scripts && timeout 150 python probe_capture_recovery.py newcomer_hf newcomer_flat) > "$dir/probe.txt" 2>&1; code=$?
            echo "$(grep -c maxdiff "$dir/probe.txt") maxdiff lines; $(grep -o "'recompiles': [0-9]*" "$dir/probe.txt" | tr '\n' ' ')" > "$dir/line" ;;
        kernels)
            timeout 200 python scripts/kernel_counts.py --layers 4 --tokens 8 \
                --ways static,unbacked,pieces,pieces-unbacked,torchpcg-auto > "$dir/kernel-counts.md" 2> "$dir/kernel-counts.err"; code=$?
            grep -m1 "total" "$dir/kernel-counts.md" > "$dir/line" ;;
        bench)
            timeout 420 python -m bench.decoder --no-progress --tokens 1,8,32,128,512 --repeats 20 \
                --modes reduce-overhead,eager-cudagraph,inductor-cudagraph,piecewise,piecewise-full-decode \
                --out "$dir" > "$dir/bench.log" 2>&1; code=$?
            grep -A4 "^| T | piecewise / inductor-cudagraph" "$dir"/*.md | tail -3 | tr '\n' ' ' > "$dir/line" ;;
        direct)
            timeout 300 python -m bench.decoder --no-progress --tokens 1,8,32,128,512 --repeats 20 \
                --modes inductor-cudagraph,piecewise,piecewise-full-decode --piecewise-option skip_guard_check=1 \
                --out "$dir" > "$dir/bench.log" 2>&1; code=$?
            grep -A4 "^| T | piecewise / inductor-cudagraph" "$dir"/*.md | tail -3 | tr '\n' ' ' > "$dir/line" ;;
        attention)
            timeout 120 python scripts/attention_host_cost.py > "$dir/attention-host-cost.md" 2>&1; code=$?
            grep -A6 "First call" "$dir/attention-host-cost.md" | tail -4 | tr '\n' ' ' > "$dir/line" ;;
        memory)
            # A cache folder of its own: on the shared one it would warm the bench's piecewise setup
            # (at 894d215 the bench then read 6.2 s for piecewise against a cold 43.4 s whole-model build).
            TORCHINDUCTOR_CACHE_DIR="$dir/inductor-cache" timeout 300 python scripts/graph_memory.py \
                > "$dir/graph-memory.md" 2> "$dir/graph-memory.err"; code=$?
            rm -rf "$dir/inductor-cache"
            grep -m1 "Reserved delta" "$dir/graph-memory.md" > "$dir/line" ;;
        warmref)
            timeout 400 python -m bench.warm_start --reference --no-concurrent --out "$dir" > "$dir/warm-start-reference.md" 2>&1; code=$?
            grep -E "^\| (cold|warm) " "$dir/warm-start-reference.md" | tr '\n' ' ' > "$dir/line" ;;
        setup)
            timeout 400 python scripts/setup_breakdown.py --modes inductor-cudagraph,piecewise --out "$dir/setup.json" \
                > "$dir/setup.md" 2> "$dir/setup.err"; code=$?
            grep "^## " "$dir/setup.md" | tr '\n' ' ' > "$dir/line" ;;
        warmsetup)
            timeout 400 python scripts/setup_breakdown.py --modes piecewise --warm --out "$dir/warm-setup.json" \
                > "$dir/warm-setup.md" 2> "$dir/warm-setup.err"; code=$?
            grep "^## " "$dir/warm-setup.md" | tr '\n' ' ' > "$dir/line" ;;
        profile)
            timeout 240 python -m bench.profile_decode --tokens 1,8,32,512 --calls 20 \
                --modes inductor-cudagraph,piecewise,piecewise-full-decode --out "$dir/profile.json" \
                > "$dir/profile.md" 2> "$dir/profile.err"; code=$?
            grep -E "^\| piecewise \| (1|512) " "$dir/profile.md" | tr '\n' ' ' > "$dir/line" ;;
        packed)
            timeout 400 python -m bench.decoder --no-progress --tokens 1,8,32,128,512 --repeats 20 --attention packed \
                --modes inductor-cudagraph,piecewise,piecewise-full-decode --out "$dir" > "$dir/bench.log" 2>&1; code=$?
            grep -A4 "^| T | piecewise / inductor-cudagraph" "$dir"/*.md | tail -3 | tr '\n' ' ' > "$dir/line" ;;
        abopt)
            # AB_OPTION (default skip_guard_check=1) off/on/off/on, one process each on one machine, so a
            # drift of the host's speed (7.6 -> 9.2 µs per op between two back-to-back runs on 2026-11-30)
            # falls on both settings; each record notes the host speed per mode.
            local i option=${AB_OPTION:-skip_guard_check=1} flags name
            for i in 1 2 3 4; do
                if [ $((i % 2)) -eq 0 ]; then flags=(--piecewise-option "$option"); name="run$i-on"; else flags=(); name="run$i-off"; fi
                mkdir -p "$dir/$name"
                timeout 140 python -m bench.decoder --no-progress --tokens 1,8,32,128,512 --repeats 20 \
                    --modes inductor-cudagraph,piecewise,piecewise-full-decode "${flags[@]}" \
                    --out "$dir/$name" > "$dir/$name/bench.log" 2>&1 || code=$?
                grep -A3 "^| T | piecewise / inductor-cudagraph" "$dir/$name"/*.md | tail -2 \
                    | tr '\n' ' ' | sed "s/^/$name ($option): /" >> "$dir/line"
            done ;;
        layers)
            timeout 200 python scripts/host_layers.py --tokens 1,8 --out "$dir/host-layers.json" > "$dir/host-layers.md" 2> "$dir/host-layers.err"; code=$?
            grep -E "^\| (copy\+replay|torchpcg.compile) " "$dir/host-layers.md" | tr '\n' ' ' > "$dir/line" ;;
        gpuside)
            timeout 300 python scripts/gpu_side.py --out "$dir/gpu-side.json" > "$dir/gpu-side.md" 2> "$dir/gpu-side.err"; code=$?
            grep -E "^\| piecewise \| (1|32|512) " "$dir/gpu-side.md" | tr '\n' ' ' > "$dir/line" ;;
        precompile)
            timeout 400 python scripts/precompile_probe.py compare --runs 2 --reference > "$dir/precompile.md" 2> "$dir/precompile.err"; code=$?
            grep -E "median" "$dir/precompile.md" | tr '\n' ' ' > "$dir/line" ;;
        mixed)
            timeout 420 python -m bench.mixed --out "$dir" > "$dir/mixed.log" 2>&1; code=$?
            grep -A9 "^Each mode's time" "$dir"/*-mixed-*.md | grep -E "^\| (piecewise|torchpcg)" | tr '\n' ' ' > "$dir/line" ;;
        mixedprofile)
            timeout 300 python scripts/mixed_profile.py > "$dir/mixed-profile.md" 2> "$dir/mixed-profile.err"; code=$?
            grep -E "^\| (torch|cudnn-last) \| 1 " "$dir/mixed-profile.md" | tr '\n' ' ' > "$dir/line" ;;
        moe)
            timeout 400 python -m bench.moe --out "$dir" > "$dir/moe.log" 2>&1; code=$?
            grep -E "^piecewise ÷" "$dir"/*-moe-*.md | tr '\n' ' ' > "$dir/line" ;;
        generate)
            timeout 500 python -m bench.generate --repeats 3 --varied-prompts 9 --out "$dir/generate-llama.json" \
                > "$dir/generate-llama.md" 2> "$dir/generate-llama.err"; code=$?
            grep -E "^\| (hf-compile|torchpcg|compile_config) " "$dir/generate-llama.md" | tr '\n' ' ' > "$dir/line" ;;
        warm)
            timeout 300 python -m bench.warm_start --out "$dir" > "$dir/warm-start.md" 2>&1; code=$?
            grep -E "^\| (cold|warm) " "$dir/warm-start.md" | tr '\n' ' ' > "$dir/line" ;;
        *)
            echo "unknown stage '$stage': choose from tests, probe, kernels, bench, direct, abopt, layers, gpuside, attention, memory, warm, warmref, setup, warmsetup, profile, packed, precompile, mixed, mixedprofile, moe, generate" >&2
            return 2 ;;
    esac
    echo "$stage @ $BENCH_COMMIT: exit $code, $((SECONDS - started)) s: $(cat "$dir/line" 2>/dev/null)" | tee -a "$out/summary.txt"
    rm -f "$dir/line"
    tar czf "$out/$stage.tar.gz" -C "$dir" .
}

[ $# -gt 0 ] || { sed -n '2,20p' "$0"; exit 2; }
for stage in "$@"; do
    run_stage "$stage" || exit $?
done
