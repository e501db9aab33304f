# Shared bash functions of sh/sweep.sh and sh/digits_minisweep.sh (sourced, not run).
#
# A sweep is a manifest: one TSV line per expected training run,
#     run_dir <TAB> eval_dir <TAB> train command <TAB> PGD-eval command <TAB> AutoAttack command
# ("-" for a step that is switched off; '#' lines are comments). The run folders are computed by the entry
# scripts' own parser and `utils.runlog.run_dir`, so the sweep and the runs cannot disagree on names.
# `sw_run_line MANIFEST N` does line N: train (skipped when status.json says finished, else
# `--resume auto`, which resumes a partial run or starts a fresh one), then the PGD evaluation of
# model_best.pth.tar, then AutoAttack on it (each skipped when its result is newer than model_best and came
# from the same command).
# Backends: sequential, one worker per GPU (lines claimed dynamically), or a SLURM job array whose task i
# runs line i of a frozen copy of the manifest.

SW_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SW_PYTHON="${PYTHON:-python3}"
SW_REQUEUE_EXIT=75 # the entry scripts' exit status after a SIGTERM/SIGUSR1 checkpoint: run again later

sw_say() { printf '%s\n' "$*"; }
sw_die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# sw_quote ARGS...: one shell-quoted string (readable: plain words stay plain).
sw_quote() {
    local out="" a
    for a in "$@"; do
        out+="${out:+ }$(printf '%q' "$a")"
    done
    printf '%s' "$out"
}

# sw_quote_prefixed ARGS...: like sw_quote, with a leading space when there is anything to quote.
sw_quote_prefixed() { [ $# = 0 ] || printf ' %s' "$(sw_quote "$@")"; }

# sw_calc EXPR: floating-point arithmetic (awk), printed with up to 10 significant digits.
sw_calc() { awk "BEGIN { printf \"%.10g\", $1 }"; }

# sw_split_list "a,b c": one item per line (commas or spaces).
sw_split_list() { printf '%s\n' $1 | tr ',' '\n' | sed '/^$/d'; }

# sw_arch DATASET FAMILY: the registry base name (no _ori/_moe) of an arch family for a dataset.
# CIFAR-style nets on 32x32 data; ImageNet-style ResNet/WRN/DenseNet on TinyImageNet and ImageNet;
# vgg16_bn everywhere. A full base name (e.g. resnet18_imagenet) is used as given.
sw_arch() {
    local dataset="$1" family="$2" style=cifar
    case "$dataset" in TinyImageNet | ImageNet) style=imagenet ;; esac
    case "$family" in
    *_cifar | *_imagenet | vgg16 | vgg16_bn) printf '%s' "$family" ;;
    resnet18 | resnet34 | resnet50 | resnet101 | resnet152 | wrn_28_4 | wrn_28_10 | wrn_34_10 | densenet)
        printf '%s_%s' "$family" "$style" ;;
    *) return 1 ;;
    esac
}

# sw_state RUN_DIR: the state in RUN_DIR/status.json (finished, running, failed, interrupted), or none.
sw_state() {
    local f="$1/status.json" s=""
    if [ -f "$f" ]; then
        s="$(sed -n 's/.*"state"[[:space:]]*:[[:space:]]*"\([a-z_]*\)".*/\1/p' "$f" | head -n 1)"
    fi
    printf '%s' "${s:-none}"
}

# sw_fresh RESULT CHECKPOINT: RESULT exists and is not older than CHECKPOINT.
sw_fresh() { [ -e "$1" ] && [ -e "$2" ] && [ ! "$1" -ot "$2" ]; }

# Evaluation and AutoAttack count as done when their result is newer than model_best.pth.tar and was made
# by the same command (recorded in RUN_DIR/.sweep_{eval,autoattack}_command after it succeeded): changed
# settings (attacks, n_ex, eps...) run them again.
SW_EVAL_RECORD=.sweep_eval_command
SW_AA_RECORD=.sweep_autoattack_command
sw_same_command() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }
sw_train_done() { [ "$(sw_state "$1")" = finished ]; }
# sw_eval_done RUN_DIR EVAL_DIR EVAL_COMMAND;  sw_aa_done RUN_DIR AA_COMMAND
sw_eval_done() {
    [ "$(sw_state "$2")" = finished ] && sw_fresh "$2/metrics.jsonl" "$1/checkpoint/model_best.pth.tar" &&
        sw_same_command "$1/$SW_EVAL_RECORD" "$3"
}
sw_aa_done() {
    sw_fresh "$1/autoattack.json" "$1/checkpoint/model_best.pth.tar" && sw_same_command "$1/$SW_AA_RECORD" "$2"
}

# ---------------------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------------------

SW_MANIFEST_HEADER="#run_dir	eval_dir	command	eval_command	autoattack_command"

sw_manifest_count() { grep -vc '^#' "$1" || true; }
sw_manifest_line() {
    local line
    line="$(grep -v '^#' "$1" | sed -n "${2}p")" || true
    [ -n "$line" ] || {
        printf 'error: %s has no line %s\n' "$1" "$2" >&2
        return 2
    }
    printf '%s' "$line"
}

# Reads training commands (one shell-quoted command per line) on stdin; prints run_dir<TAB>eval_dir for
# each, from the entry scripts' parser (which also rejects bad flags here, before anything runs).
SW_RESOLVE_PY='
import os, shlex, sys
sys.path.insert(0, os.getcwd())
try:
    from args import parse_args
    from utils.errors import UsageError
    from utils.runlog import run_dir
except ImportError as e:
    sys.exit(f"error: cannot compute run folders ({e}); run the sweep from a complete checkout")
for n, line in enumerate(sys.stdin, 1):
    argv = shlex.split(line)
    script = os.path.splitext(os.path.basename(argv[1]))[0]
    try:
        args = parse_args(argv[2:], script=script)
    except SystemExit:
        sys.exit(f"error: sweep command {n} is rejected by {argv[1]} (message above): {line.strip()}")
    except UsageError as e:
        sys.exit(f"error: sweep command {n} is rejected by {argv[1]}: {e}: {line.strip()}")
    train, evaluate = run_dir(args, script), run_dir(args, script, evaluate=True)
    print(os.path.abspath(train), os.path.abspath(evaluate), sep="\t")
'
sw_resolve_dirs() { (cd "$SW_ROOT" && "$SW_PYTHON" -c "$SW_RESOLVE_PY"); }

# The AutoAttack flags of the sweep (SW_AA_CMD_ARGS), checked as auto_attack_eval.py's parser and its range
# checks would, before anything runs: a dry run then catches what the real run would refuse only at the end.
SW_AA_CHECK_PY='
import os, sys
sys.path.insert(0, os.getcwd())
try:
    from args import get_autoattack_parser
except ImportError as e:
    sys.exit(f"error: cannot check the AutoAttack flags ({e}); run the sweep from a complete checkout")
parser = get_autoattack_parser()
parser.error = lambda message: sys.exit(f"error: AutoAttack flags rejected by auto_attack_eval.py: {message}")
a = parser.parse_args(["--source-net", "CHECKPOINT", *sys.argv[1:]])
problems = []
if a.n_ex is not None and a.n_ex < 1:
    problems.append(f"--aa-n-ex must be >= 1, got {a.n_ex}")
if not a.epsilon > 0 or (a.norm == "Linf" and a.epsilon > 255):
    problems.append(f"--aa-epsilon must be in (0, 255] (1/255 units), got {a.epsilon:g}")
if a.version == "custom" and not a.attacks:
    problems.append("--aa-version custom needs --aa-attacks")
if not 0 <= a.seed <= 2**32 - 1:
    problems.append(f"--seed must be in [0, 2**32 - 1], got {a.seed}")
if problems:
    sys.exit("error: " + "; ".join(problems))
'
sw_check_aa_args() { (cd "$SW_ROOT" && "$SW_PYTHON" -c "$SW_AA_CHECK_PY" "$@") || exit 2; }

# sw_check_manifest_path FILE: exit 2 unless FILE is new or a manifest this script wrote (its first line is the
# header): a sweep never replaces a file it did not make, not even in a dry run.
sw_check_manifest_path() {
    local file="$1" first=""
    [ -e "$file" ] || return 0
    [ -f "$file" ] || sw_die "--manifest $file exists and is not a regular file"
    IFS= read -r first <"$file" || true
    [ "$first" = "$SW_MANIFEST_HEADER" ] || sw_die "--manifest $file exists and is not a sweep manifest (its first line is not the header this script writes): choose another --manifest"
}

# sw_write_manifest FILE: from the arrays SW_TRAIN_CMDS (shell-quoted training commands), SW_EVAL_BASES (the
# same without training-only flags; --evaluate --resume BEST is appended) and SW_RUN_DATASETS (each run's
# dataset), and the settings SW_EVAL (1/0), SW_AA (1/0), SW_AA_CMD_ARGS (array: AutoAttack flags other than
# --source-net, --out and --dataset).
sw_write_manifest() {
    local file="$1" dirs tmp i run_dir eval_dir best eval_cmd aa_cmd
    sw_check_manifest_path "$file"
    dirs="$(printf '%s\n' "${SW_TRAIN_CMDS[@]}" | sw_resolve_dirs)" || exit 2
    mkdir -p "$(dirname "$file")"
    tmp="$file.tmp.$$"
    {
        printf '%s\n' "$SW_MANIFEST_HEADER"
        i=0
        while IFS=$'\t' read -r run_dir eval_dir; do
            best="$run_dir/checkpoint/model_best.pth.tar"
            eval_cmd=- aa_cmd=-
            if [ "$SW_EVAL" = 1 ]; then
                eval_cmd="${SW_EVAL_BASES[$i]} $(sw_quote --evaluate --resume "$best")"
            fi
            if [ "$SW_AA" = 1 ]; then
                aa_cmd="$(sw_quote "$SW_PYTHON" auto_attack_eval.py --source-net "$best" \
                    --out "$run_dir/autoattack.json" --dataset "${SW_RUN_DATASETS[$i]}" \
                    ${SW_AA_CMD_ARGS[@]+"${SW_AA_CMD_ARGS[@]}"})"
            fi
            printf '%s\t%s\t%s\t%s\t%s\n' "$run_dir" "$eval_dir" "${SW_TRAIN_CMDS[$i]}" "$eval_cmd" "$aa_cmd"
            i=$((i + 1))
        done <<<"$dirs"
    } >"$tmp"
    mv "$tmp" "$file"
}

# ---------------------------------------------------------------------------------------------------------
# Running one line
# ---------------------------------------------------------------------------------------------------------

# sw_exec COMMAND_STRING: run it in the repository root; SIGTERM/SIGINT/SIGUSR1 received meanwhile are
# passed on as SIGTERM/SIGTERM/SIGUSR1 (the entry scripts then checkpoint and exit 75). Returns its status.
sw_exec() {
    local cmd="$1" child rc
    (cd "$SW_ROOT" && eval "exec $cmd") &
    child=$!
    SW_SIGNALLED=0
    while :; do
        SW_WAKE=0
        trap 'SW_SIGNALLED=1; SW_WAKE=1; kill -TERM "$child" 2>/dev/null || true' TERM INT
        trap 'SW_SIGNALLED=1; SW_WAKE=1; kill -USR1 "$child" 2>/dev/null || true' USR1
        rc=0
        wait "$child" || rc=$?
        [ "$SW_WAKE" = 1 ] || break # woken by the child's exit, not by a signal we forwarded
    done
    trap - TERM INT USR1
    return "$rc"
}

# sw_run_line MANIFEST N [DRY_RUN]: train, evaluate and AutoAttack line N (1-based) as needed.
# Prints one line per step ("[N] skip train (finished): NAME", "[N] start train: CMD", ...). Returns 0, the
# failing step's status (75: training interrupted, checkpoint written; SW_SIGNALLED=1 when a signal
# arrived during any step): run the line again.
# One evaluation stage of a manifest line (eval or autoattack): skipped when its command is "-", or when the
# run was not (re)trained now and `done_fn done_args...` says its result is current; else run, and on success
# record the command in `record`. Returns the command's status.
#   sw_stage N NAME TRAINED THEN DRY LABEL CMD RECORD DONE_FN [DONE_ARGS...]
sw_stage() {
    local n="$1" name="$2" trained="$3" then="$4" dry="$5" label="$6" cmd="$7" record="$8" rc=0
    shift 8
    [ "$cmd" != - ] || return 0
    if [ "$trained" = 1 ] && "$@" "$cmd"; then
        sw_say "[$n] skip $label (done): $name"
        return 0
    fi
    sw_say "[$n] ${then}$label: $cmd"
    [ "$dry" != 1 ] || return 0
    sw_exec "$cmd" || rc=$?
    if [ "$rc" != 0 ]; then
        sw_say "[$n] $label exited with status $rc: $name"
        return "$rc"
    fi
    printf '%s\n' "$cmd" >"$record"
}

sw_run_line() {
    local manifest="$1" n="$2" dry="${3:-0}" line run_dir eval_dir train_cmd eval_cmd aa_cmd
    line="$(sw_manifest_line "$manifest" "$n")" || return 2
    IFS=$'\t' read -r run_dir eval_dir train_cmd eval_cmd aa_cmd <<<"$line"
    local name state action rc trained=1
    name="$(basename "$run_dir")"
    state="$(sw_state "$run_dir")"
    if [ "$state" = finished ]; then
        sw_say "[$n] skip train (finished): $name"
    else
        trained=0
        if [ -e "$run_dir/checkpoint/checkpoint.pth.tar" ]; then
            action="resume train ($state)"
        else
            action="start train"
        fi
        sw_say "[$n] $action: $train_cmd --resume auto"
        if [ "$dry" != 1 ]; then
            rc=0
            sw_exec "$train_cmd --resume auto" || rc=$?
            if [ "$rc" != 0 ]; then
                sw_say "[$n] train exited with status $rc: $name"
                return "$rc"
            fi
            trained=1
        fi
    fi
    local then=""
    [ "$trained" = 1 ] || then="then "
    sw_stage "$n" "$name" "$trained" "$then" "$dry" eval "$eval_cmd" "$run_dir/$SW_EVAL_RECORD" \
        sw_eval_done "$run_dir" "$eval_dir" || return $?
    sw_stage "$n" "$name" "$trained" "$then" "$dry" autoattack "$aa_cmd" "$run_dir/$SW_AA_RECORD" \
        sw_aa_done "$run_dir" || return $?
    return 0
}

# sw_line_done MANIFEST N: every step of line N has its up-to-date result.
sw_line_done() {
    local line run_dir eval_dir train_cmd eval_cmd aa_cmd
    line="$(sw_manifest_line "$1" "$2")" || return 1
    IFS=$'\t' read -r run_dir eval_dir train_cmd eval_cmd aa_cmd <<<"$line"
    sw_train_done "$run_dir" || return 1
    if [ "$eval_cmd" != - ]; then sw_eval_done "$run_dir" "$eval_dir" "$eval_cmd" || return 1; fi
    if [ "$aa_cmd" != - ]; then sw_aa_done "$run_dir" "$aa_cmd" || return 1; fi
    return 0
}

# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------

# sw_run_sequential MANIFEST DRY_RUN: every line in order. A failed line does not stop the others;
# an interrupted one (75) stops the sweep. Returns 0, 1 (some line failed) or 75.
sw_run_sequential() {
    local manifest="$1" dry="$2" total n rc failed=0
    total="$(sw_manifest_count "$manifest")"
    for ((n = 1; n <= total; n++)); do
        rc=0
        sw_run_line "$manifest" "$n" "$dry" || rc=$?
        if [ "$rc" = "$SW_REQUEUE_EXIT" ] || [ "${SW_SIGNALLED:-0}" = 1 ]; then
            sw_say "sweep interrupted at line $n; run the same command again to continue (training resumes from its checkpoint)"
            return "$SW_REQUEUE_EXIT"
        fi
        [ "$rc" = 0 ] || failed=$((failed + 1))
    done
    if [ "$failed" != 0 ]; then
        sw_say "$failed of $total lines failed (see the messages above and each run's setup.log)"
        return 1
    fi
    return 0
}

# sw_worker MANIFEST GPU CLAIMS LOGDIR: claim lines (mkdir is atomic) and run them on one GPU.
sw_worker() {
    local manifest="$1" gpu="$2" claims="$3" logdir="$4" total n rc log line
    export CUDA_VISIBLE_DEVICES="$gpu"
    total="$(sw_manifest_count "$manifest")"
    for ((n = 1; n <= total; n++)); do
        [ ! -e "$claims/stop" ] || return 0
        mkdir "$claims/line$n" 2>/dev/null || continue
        line="$(sw_manifest_line "$manifest" "$n")"
        log="$logdir/$(basename "${line%%	*}").log"
        sw_say "[gpu $gpu] line $n -> $log"
        rc=0
        sw_run_line "$manifest" "$n" 0 >>"$log" 2>&1 || rc=$?
        if [ "$rc" = "$SW_REQUEUE_EXIT" ] || [ "${SW_SIGNALLED:-0}" = 1 ]; then
            touch "$claims/stop"
            sw_say "[gpu $gpu] line $n interrupted"
            return 0
        elif [ "$rc" != 0 ]; then
            touch "$claims/failed$n"
            sw_say "[gpu $gpu] line $n failed with status $rc (see $log)"
        else
            sw_say "[gpu $gpu] line $n done"
        fi
    done
}

# sw_run_parallel MANIFEST GPUS(csv) LOGDIR: one worker per GPU. Returns 0, 1 (failures) or 75.
sw_run_parallel() {
    local manifest="$1" gpus="$2" logdir="$3" claims g pids=() failed
    claims="$(mktemp -d "${TMPDIR:-/tmp}/sweep-claims.XXXXXX")"
    mkdir -p "$logdir"
    for g in $(sw_split_list "$gpus"); do
        sw_worker "$manifest" "$g" "$claims" "$logdir" &
        pids+=($!)
    done
    trap 'touch "$claims/stop"; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
    trap 'touch "$claims/stop"; kill -USR1 "${pids[@]}" 2>/dev/null || true' USR1
    local p
    for p in "${pids[@]}"; do
        while :; do
            if wait "$p"; then break; fi
            kill -0 "$p" 2>/dev/null || break
        done
    done
    trap - TERM INT USR1
    failed="$(find "$claims" -maxdepth 1 -name 'failed*' | wc -l | tr -d ' ')"
    if [ -e "$claims/stop" ]; then
        sw_say "sweep interrupted; run the same command again to continue (training resumes from its checkpoint)"
        return "$SW_REQUEUE_EXIT"
    fi
    if [ "$failed" != 0 ]; then
        sw_say "$failed lines failed (logs in $logdir)"
        return 1
    fi
    return 0
}

# sw_array_spec N...: "1-3,5,7-8" from sorted line numbers.
sw_array_spec() {
    local out="" start="" prev="" n
    for n in "$@"; do
        if [ -n "$prev" ] && [ "$n" = $((prev + 1)) ]; then
            prev="$n"
            continue
        fi
        [ -z "$start" ] || out+="${out:+,}$start$([ "$start" = "$prev" ] || printf -- '-%s' "$prev")"
        start="$n" prev="$n"
    done
    [ -z "$start" ] || out+="${out:+,}$start$([ "$start" = "$prev" ] || printf -- '-%s' "$prev")"
    printf '%s' "$out"
}

# sw_write_sbatch FILE MANIFEST LOGDIR GRES: the job-array script; task i runs line i of MANIFEST.
# SLURM sends SIGUSR1 to the batch shell 180 s before the time limit (and SIGTERM on preemption); it is
# passed to the run, which checkpoints and exits 75; the task then requeues itself and resumes.
sw_write_sbatch() {
    local file="$1" manifest="$2" logdir="$3" gres="$4"
    {
        printf '#!/usr/bin/env bash\n'
        printf '#SBATCH --job-name=advmoe-sweep\n'
        printf '#SBATCH --output=%s/%%A_%%a.out\n' "$logdir"
        [ -z "$gres" ] || printf '#SBATCH --gres=%s\n' "$gres"
        printf '#SBATCH --requeue\n'
        printf '#SBATCH --open-mode=append\n'
        printf '#SBATCH --signal=B:USR1@180\n'
        printf '# Written by sh/sweep.sh: array task i runs line i of the manifest below.\n'
        printf 'set -uo pipefail\n'
        printf 'export PYTHON=%s\n' "$(printf '%q' "$SW_PYTHON")"
        printf 'source %s\n' "$(printf '%q' "$SW_ROOT/sh/lib.sh")"
        printf 'rc=0\n'
        printf 'sw_run_line %s "$SLURM_ARRAY_TASK_ID" || rc=$?\n' "$(printf '%q' "$manifest")"
        printf '# 75: training checkpointed on the signal; a signalled evaluation/AutoAttack also starts again\n'
        printf 'if [ "$rc" = "$SW_REQUEUE_EXIT" ] || [ "${SW_SIGNALLED:-0}" = 1 ]; then\n'
        printf '    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"\n'
        printf '    exit "$SW_REQUEUE_EXIT"\n'
        printf 'fi\n'
        printf 'exit "$rc"\n'
    } >"$file"
    chmod +x "$file"
}

# sw_submit_slurm MANIFEST SWEEP_DIR DRY_RUN GRES MAX_PARALLEL SBATCH_ARGS REPORT_CMD: freeze the manifest,
# write the array script, submit the lines not yet done (and a report job after them).
sw_submit_slurm() {
    local manifest="$1" sweep_dir="$2" dry="$3" gres="$4" max_parallel="$5" sbatch_args="$6" report_cmd="$7"
    local total n todo=() stamp dir frozen script spec jid
    total="$(sw_manifest_count "$manifest")"
    for ((n = 1; n <= total; n++)); do
        if sw_line_done "$manifest" "$n"; then
            sw_say "[$n] skip (done): $(basename "$(sw_manifest_line "$manifest" "$n" | cut -f1)")"
        else
            todo+=("$n")
        fi
    done
    if [ "${#todo[@]}" = 0 ]; then
        sw_say "all $total lines are done; nothing to submit"
        return 0
    fi
    stamp="$(date +%Y%m%d-%H%M%S)-$$"
    dir="$sweep_dir/slurm-$stamp"
    mkdir -p "$dir/logs"
    frozen="$dir/manifest.tsv"
    cp "$manifest" "$frozen" # the array indexes this copy: a later sweep may rewrite the manifest
    script="$dir/array.sbatch"
    sw_write_sbatch "$script" "$frozen" "$dir/logs" "$gres"
    spec="$(sw_array_spec "${todo[@]}")${max_parallel:+%$max_parallel}"
    sw_say "wrote $script (array task i runs line i of $frozen)"
    local submit=(sbatch --parsable "--array=$spec")
    # shellcheck disable=SC2206
    [ -z "$sbatch_args" ] || submit+=($sbatch_args)
    submit+=("$script")
    local report=(sbatch --parsable --job-name=advmoe-report "--output=$dir/logs/report_%j.out")
    # shellcheck disable=SC2206
    [ -z "$sbatch_args" ] || report+=($sbatch_args)
    if [ "$dry" = 1 ]; then
        sw_say "dry run: $(sw_quote "${submit[@]}")"
        sw_say "dry run: $(sw_quote "${report[@]}" --dependency=afterany:JOBID --wrap="$report_cmd")"
        return 0
    fi
    command -v sbatch >/dev/null || sw_die "sbatch not found: run this on a SLURM login node (or use --backend local)"
    jid="$("${submit[@]}")" || sw_die "sbatch failed"
    jid="${jid%%;*}"
    sw_say "submitted job array $jid: ${#todo[@]} of $total lines (logs in $dir/logs)"
    local rid
    rid="$("${report[@]}" "--dependency=afterany:$jid" "--wrap=$report_cmd")" || sw_die "sbatch (report job) failed"
    sw_say "submitted report job ${rid%%;*} (runs after the array): $report_cmd"
}
