#!/usr/bin/env bash
# The device checks for a lent GPU, as two prepared phases (see BUILD.md, "GPU"). Run from the repo root
# on a machine whose python3 already has jax (CUDA), flax, optax, chex, orbax, torch:
#
#   bash scripts/gpu_checks.sh bench      # versions, a GPU test subset, benchmark suites (~4-5 min)
#   bash scripts/gpu_checks.sh rows       # the open issues' GPU rows: user model vs a PyTorch CUDA
#                                         # loop, Gramians, mini-ImageNet-size steps and memory, host
#                                         # input share (BENCH_S, default 560 s, caps it)
#   bash scripts/gpu_checks.sh omniglot   # Omniglot 5/20-way 1-shot, mean vs agreement, time-boxed
#   bash scripts/gpu_checks.sh schedule   # conv matmul vs xla, then the 60k 5-way 1-shot schedule
#                                         # with the faster one, as far as DEADLINE_S allows
#                                         # (SCHEDULE=20w1s for 20-way, 20w1s_mamlpp for MAML++;
#                                         # carried runs resume)
#
# Results go to $OUT (default /tmp/gajax_gpu). The Omniglot phase reads the archive from
# $GAJAX_DATA_DIR (default .gpu/omniglot.tar.gz) and its decoded cache from $GAJAX_CACHE_DIR
# (default .gpu/cache): copy both there before carrying .gpu to the machine. The machine's python3 has
# no ml_collections (the scripts' --config): `pip install --no-deps --target .gpu/site ml-collections`
# here (pure Python; its PyYAML comes with flax there), and .gpu/site goes on PYTHONPATH below.
# Knobs: BENCH_S (benchmark time limit, s), TRAIN_MIN (training minutes per run), DEADLINE_S (the
# schedule phase's whole wall-clock budget, s), QUICK=1 (tiny sizes: checks this script on a CPU).
set -u
OUT=${OUT:-/tmp/gajax_gpu}
mkdir -p "$OUT"
export PYTHONPATH=.:$PWD/.gpu/site PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export GAJAX_DATA_DIR=${GAJAX_DATA_DIR:-$PWD/.gpu/omniglot.tar.gz}
export GAJAX_CACHE_DIR=${GAJAX_CACHE_DIR:-$PWD/.gpu/cache}
PY=${PY:-python3}
QUICK=${QUICK:-0}
quiet() { grep --line-buffered -v "^[IW][0-9]\{4\} "; }  # absl/orbax INFO and WARNING lines
# The end of each run's log in folder $1: its last messages and progress line.
summarise() { for f in "$1"/*.log; do echo "== $f"; quiet < "$f" | grep -v "^step" | tail -4
                grep "^step" "$f" | tail -1; done; }

case "${1:-}" in
bench)
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
      || echo "no nvidia-smi"
    $PY -c "import jax, flax, optax, chex, orbax.checkpoint, torch; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, jax.devices())"
  } 2>&1 | tee "$OUT/env.txt"
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_gradient_agreement.py \
    tests/test_algorithms.py tests/test_meta.py 2>&1 | tail -25 > "$OUT/tests.txt"
  tail -3 "$OUT/tests.txt"
  if [ "$QUICK" = 1 ]; then
    args=(--quick --torch_device=cpu)
  else
    args=(--big --configs=sinusoid,omni5w_stride,omni20w_stride --torch_device=cuda --repeats=5)
  fi
  timeout "${BENCH_S:-270}" $PY scripts/benchmark.py --suite=meta_step,flops,peers "${args[@]}" \
    --torch_threads=1 --json="$OUT/bench_gpu.json" --markdown="$OUT/bench_gpu.md" 2>&1 \
    | quiet | tee "$OUT/bench_log.txt"
  ;;
rows)
  # One process per suite so that a suite past its share of BENCH_S loses only its own rows.
  if [ "$QUICK" = 1 ]; then
    args=(--quick --torch_device=cpu)
  else
    args=(--torch_device=cuda --repeats=5 --big)
  fi
  # Seconds per suite, from BENCH_S (default 560): images compiles ResNet-12 three times, so twice.
  unit=$(( ${BENCH_S:-560} / 5 ))
  for suite in user_model images host_input aggregators; do
    share=$unit; [ "$suite" = images ] && share=$((2 * unit))
    extra=()
    [ "$suite" = aggregators ] && [ "$QUICK" != 1 ] && extra=(--aggregators=mean,gradient_agreement,mgda,upgrad,imtl_g)
    timeout "$share" $PY scripts/benchmark.py --suite=$suite "${args[@]}" "${extra[@]}" --torch_threads=1 \
      --json="$OUT/bench_${suite}_gpu.json" --markdown="$OUT/bench_${suite}_gpu.md" 2>&1 \
      | quiet | tail -30 | tee "$OUT/bench_${suite}_log.txt"
  done
  ;;
omniglot)
  # MAML's settings (configs/omniglot.py): 5-way 1-shot meta-batch 32, 1 inner step at 0.4 (3 at
  # test); 20-way 1-shot meta-batch 16, 5 inner steps at 0.1. All four runs share the GPU, each for
  # TRAIN_MIN minutes of training, then 600 unseen test tasks.
  minutes=${TRAIN_MIN:-6}
  common=(--max_train_minutes="$minutes" --overwrite)
  if [ "$QUICK" = 1 ]; then
    common+=(--config.eval_tasks=20 --config.eval_every=2 --config.log_every=2
             --config.num_iterations=4)
  fi
  five=(--config=configs/omniglot.py:5w1s)
  twenty=(--config=configs/omniglot.py:20w1s)
  runs="$OUT/runs"
  mkdir -p "$runs"
  for agg in mean agreement; do
    $PY scripts/train.py "${five[@]}" "${common[@]}" --config.aggregator=$agg \
      --workdir="$runs/5w1s_$agg" > "$runs/5w1s_$agg.log" 2>&1 &
    $PY scripts/train.py "${twenty[@]}" "${common[@]}" --config.aggregator=$agg \
      --workdir="$runs/20w1s_$agg" > "$runs/20w1s_$agg.log" 2>&1 &
  done
  wait
  summarise "$runs" | tee "$OUT/omniglot_summary.txt"
  # Metrics and results only (checkpoints stay behind): one archive, as few files come back.
  (cd "$runs" && tar czf "$OUT/omniglot_runs.tar.gz" --exclude=checkpoints ./*) && rm -rf "$runs"
  ;;
schedule)
  # One lease, one call, for SCHEDULE=5w1s (default) or 20w1s, MAML's settings, 60k steps (or
  # SCHEDULE=20w1s_mamlpp, configs/omniglot.py:20w1s_mamlpp, 75k steps):
  # (1) the conv suite on that workload (matmul vs XLA convolutions); (2) the schedule with the
  # faster one: mean and agreement side by side if both fit before DEADLINE_S, else agreement alone
  # if it fits, else both time-boxed; (3) the conv suite on the other workload with the time left.
  # Each run comes back as $OUT/run_<name>.tar.gz with its checkpoints (and, while unfinished, its
  # metrics.jsonl): unpack it into .gpu/runs/ and carry .gpu, and the next call resumes it.
  t0=$(date +%s)
  deadline=$((t0 + ${DEADLINE_S:-550}))
  schedule=${SCHEDULE:-5w1s}
  case "$schedule" in
    5w1s) cfg=omni5w_stride other=omni20w_stride steps=60000 ;;
    20w1s) cfg=omni20w_stride other=omni5w_stride steps=60000 ;;
    # MAML++ (#15): its 75k schedule; the conv suite's MAML 20-way workload (meta-batch 16, 5 steps)
    # stands in for its step time (meta-batch 8, 5 steps): the plan errs on the slow side.
    20w1s_mamlpp) cfg=omni20w_stride other=omni5w_stride steps=75000 ;;
    *) echo "SCHEDULE must be 5w1s, 20w1s or 20w1s_mamlpp; got $schedule" >&2; exit 2 ;;
  esac
  { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
      || echo "no nvidia-smi"
    $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, jax.devices())"
  } 2>&1 | tee "$OUT/summary.txt"
  if [ "$QUICK" = 1 ]; then quick=(--quick); else quick=(--configs=$cfg --repeats=5); fi
  timeout "${BENCH_S:-150}" $PY scripts/benchmark.py --suite=conv "${quick[@]}" \
    --json="$OUT/conv_$cfg.json" 2>&1 | quiet | tail -8
  [ "$QUICK" = 1 ] && steps=4
  # Plan from the measured per-step times and the steps still to go (a carried run resumes).
  # Concurrent runs share the GPU: 1.7x per run is a guess (two 5-way runs on an H100 got 0.38x
  # of one alone each, by the conv suite; two 20-way runs 0.42x).
  read -r conv plan minutes <<<"$($PY - "$OUT/conv_$cfg.json" $((deadline - $(date +%s))) $steps \
      .gpu/runs/${schedule}_mean .gpu/runs/${schedule}_agreement <<'PYEOF'
import json, os, sys
try:  # A benchmark that failed or ran out of time leaves no rows: then matmul, time-boxed.
  rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r.get("aggregator") == "mean"]
except (OSError, ValueError, KeyError):
  rows = []
left, steps = float(sys.argv[2]) - 90, int(sys.argv[3])  # 90 s: final evaluations, archives.
best = min(rows, key=lambda r: r["median_ms"]) if rows else {"conv": "matmul", "median_ms": 1e9}
def done(run):
  ckpt = os.path.join(run, "checkpoints")
  return max([int(d) for d in os.listdir(ckpt) if d.isdigit()], default=0) if os.path.isdir(ckpt) else 0
todo = [steps - done(run) for run in sys.argv[4:]]
ms = best["median_ms"] / 1000
both, one = max(todo) * ms * 1.7 + 60, todo[1] * ms + 60
plan = "both" if both <= left else "agreement" if one <= left else "both_timeboxed"
print(best["conv"], plan, f"{max(left, 60) / 60:.2f}")
PYEOF
)"
  echo "plan: conv=$conv, $plan, --max_train_minutes=$minutes" | tee -a "$OUT/summary.txt"
  common=(--config=configs/omniglot.py:$schedule --config.num_iterations=$steps
          --config.eval_every=5000 --config.conv_impl="$conv" --max_train_minutes="$minutes")
  if [ "$QUICK" = 1 ]; then
    common+=(--config.eval_tasks=20 --config.eval_every=2 --config.log_every=2)
  fi
  runs="$OUT/runs"
  mkdir -p "$runs"
  aggs="mean agreement"
  [ "$plan" = agreement ] && aggs=agreement
  for agg in $aggs; do
    name=${schedule}_$agg
    fresh=(--overwrite)
    if [ -d ".gpu/runs/$name" ]; then
      cp -r ".gpu/runs/$name" "$runs/" && fresh=()
      [ -f ".gpu/runs/$name.log" ] && cp ".gpu/runs/$name.log" "$runs/"
    fi
    $PY scripts/train.py "${common[@]}" "${fresh[@]}" --config.aggregator=$agg --workdir="$runs/$name" \
      >> "$runs/$name.log" 2>&1 &
  done
  wait
  summarise "$runs" | tee -a "$OUT/summary.txt"
  # One archive per run, with its checkpoints; a finished run leaves its per-step metrics behind
  # if they would take the archive over the 16 MB a file may bring back (eval_curve.jsonl stays).
  for d in "$runs"/*/; do
    name=$(basename "$d")
    grep '"eval_mean"' "$d/metrics.jsonl" > "$d/eval_curve.jsonl"
    (cd "$runs" && tar czf "$OUT/run_$name.tar.gz" "$name" "$name.log")
    if [ "$(stat -c %s "$OUT/run_$name.tar.gz")" -gt 15000000 ] && [ -f "$d/eval.json" ] \
        && grep -q '"stopped_early": false' "$d/eval.json"; then
      (cd "$runs" && tar czf "$OUT/run_$name.tar.gz" --exclude=metrics.jsonl "$name" "$name.log")
    fi
  done
  rm -rf "$runs"
  left=$((deadline - $(date +%s)))
  if [ "$QUICK" != 1 ] && [ "$left" -gt 100 ]; then
    timeout $((left - 10)) $PY scripts/benchmark.py --suite=conv --configs=$other \
      --repeats=3 --json="$OUT/conv_$other.json" 2>&1 | quiet | tail -6
  fi
  echo "schedule phase: $(( $(date +%s) - t0 )) s"
  ;;
*)
  echo "usage: bash scripts/gpu_checks.sh bench|omniglot|schedule" >&2
  exit 2
  ;;
esac
