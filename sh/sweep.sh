#!/usr/bin/env bash
# The paper's comparison as one sweep: for each dataset and architecture, dense adversarial training (TRADES)
# at ratio 1.0 and 0.5, an MoE at ratio 0.5 with N=2 experts trained jointly (joint AT) and by AdvMoE; then
# the PGD evaluation (`--evaluate`) and AutoAttack of each best checkpoint; then the report (table + plots).
#
#   sh/sweep.sh [options] [-- extra flags for train_ori.py/train_moe.py]
#
#   --preset paper|digits   paper (default): CIFAR10,CIFAR100,TinyImageNet x resnet18,wrn_28_10,vgg16_bn,densenet,
#                           100 epochs, the entry scripts' default attack (eps 8/255), AutoAttack standard on
#                           the whole test set. digits: see sh/digits_minisweep.sh.        [env SWEEP_PRESET]
#   --backend local|slurm   local: runs here, in sequence or one per GPU (--gpus); slurm: writes a job-array
#                           script (task i = manifest line i) and submits it with sbatch --array, plus a
#                           report job that runs after it.                                 [env SWEEP_BACKEND]
#   --gpus 0,1,...          local backend: one run per GPU in parallel (CUDA_VISIBLE_DEVICES per run, lines
#                           claimed as GPUs free up; each line's output goes to SAVE/sweep_logs/). [env SWEEP_GPUS]
#   --datasets LIST  --archs LIST  --methods LIST   filters (comma-separated). archs are families
#                           (resnet18, wrn_28_10, vgg16_bn, densenet: the CIFAR variant on 32x32 data, the
#                           ImageNet variant on TinyImageNet/ImageNet) or full names (resnet18_imagenet);
#                           methods: dense, joint, advmoe, advmoe-reference (router trained on the reference's
#                           objective; not in the default list).
#   --epochs E              [env SWEEP_EPOCHS]     --seed S
#   --dense-ratios LIST (1.0,0.5)   --moe-ratio R (0.5)   --n-expert N (2)
#   --save-dir DIR          run folders go to DIR/training/..., evaluations to DIR/evaluate/... (default
#                           results; digits: results/digits_minisweep)                     [env SWEEP_SAVE_DIR]
#   --data-dir DIR          passed to every command
#   --tag ID                prefix of the runs' --exp-identifier (ID_dense, ID_joint, ...; default: the method)
#   --manifest FILE         where to write the manifest (default SAVE/manifest.tsv); an existing FILE is
#                           replaced only when it is a manifest this script wrote
#   --aa-n-ex N  --aa-version V  --aa-attacks "a b"  --aa-epsilon E (1/255 units)   AutoAttack settings
#   --no-eval  --no-autoattack  --no-report
#   --report-dir DIR        (default SAVE/report)
#   --sbatch-args "ARGS"    extra sbatch flags (partition, time, account...; override the script's #SBATCH
#                           lines) [env SWEEP_SBATCH_ARGS]     --max-parallel P   (array throttle %P)
#   --dry-run               write the manifest (and the sbatch script), print what would run, run nothing
#
# The manifest (SAVE/manifest.tsv: run_dir, eval_dir and the three commands per line) is written first; the
# report lists its runs that have no folder as `missing`. Finished runs (status.json "finished") are skipped;
# any other run is started with `--resume auto`, which resumes a partial run from its checkpoint. Evaluation
# and AutoAttack are skipped when their result is newer than model_best.pth.tar and was made by the same
# command (so changing e.g. --aa-n-ex reruns AutoAttack, which itself resumes its finished chunks when the
# settings are unchanged). Exit status: 0; 1 when some
# run failed (the others still ran); 2 for bad usage; 75 when interrupted (checkpoints written: run the same
# command again to continue).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$HERE/lib.sh"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

preset="${SWEEP_PRESET:-paper}"
backend="${SWEEP_BACKEND:-local}"
gpus="${SWEEP_GPUS:-}"
save_dir="${SWEEP_SAVE_DIR:-}"
sbatch_args="${SWEEP_SBATCH_ARGS:-}"
datasets="" archs="" methods="" epochs="${SWEEP_EPOCHS:-}" seed="" dense_ratios="" moe_ratio="" n_expert=""
data_dir="" tag="" manifest="" report_dir="" max_parallel="" dry_run=0
aa_n_ex="" aa_version="" aa_attacks="" aa_epsilon="" SW_EVAL=1 SW_AA=1 report=1
extra=()

need() { [ $# -ge 2 ] && [ -n "$2" ] || sw_die "$1 needs a value (see sh/sweep.sh --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage; exit 0 ;;
    --preset) need "$@"; preset="$2"; shift 2 ;;
    --backend) need "$@"; backend="$2"; shift 2 ;;
    --gpus) need "$@"; gpus="$2"; shift 2 ;;
    --datasets) need "$@"; datasets="$2"; shift 2 ;;
    --archs) need "$@"; archs="$2"; shift 2 ;;
    --methods) need "$@"; methods="$2"; shift 2 ;;
    --epochs) need "$@"; epochs="$2"; shift 2 ;;
    --seed) need "$@"; seed="$2"; shift 2 ;;
    --dense-ratios) need "$@"; dense_ratios="$2"; shift 2 ;;
    --moe-ratio) need "$@"; moe_ratio="$2"; shift 2 ;;
    --n-expert) need "$@"; n_expert="$2"; shift 2 ;;
    --save-dir) need "$@"; save_dir="$2"; shift 2 ;;
    --data-dir) need "$@"; data_dir="$2"; shift 2 ;;
    --tag) need "$@"; tag="$2"; shift 2 ;;
    --manifest) need "$@"; manifest="$2"; shift 2 ;;
    --report-dir) need "$@"; report_dir="$2"; shift 2 ;;
    --aa-n-ex) need "$@"; aa_n_ex="$2"; shift 2 ;;
    --aa-version) need "$@"; aa_version="$2"; shift 2 ;;
    --aa-attacks) need "$@"; aa_attacks="$2"; shift 2 ;;
    --aa-epsilon) need "$@"; aa_epsilon="$2"; shift 2 ;;
    --no-eval) SW_EVAL=0; shift ;;
    --no-autoattack) SW_AA=0; shift ;;
    --no-report) report=0; shift ;;
    --sbatch-args) need "$@"; sbatch_args="$2"; shift 2 ;;
    --max-parallel) need "$@"; max_parallel="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) sw_die "unknown option $1 (flags for the training scripts go after --; see sh/sweep.sh --help)" ;;
    esac
done

# ---- preset defaults (options above win) ----------------------------------------------------------------
preset_args=() train_only_args=() aa_extra=() gres="gpu:1" report_flags=()
case "$preset" in
paper)
    : "${datasets:=CIFAR10,CIFAR100,TinyImageNet}" "${archs:=resnet18,wrn_28_10,vgg16_bn,densenet}"
    : "${methods:=dense,joint,advmoe}" "${epochs:=100}" "${dense_ratios:=1.0,0.5}" "${moe_ratio:=0.5}"
    : "${n_expert:=2}" "${aa_version:=standard}" "${aa_epsilon:=8}" "${save_dir:=results}"
    ;;
digits)
    # Digits saturates at eps 8/255; at eps 0.15 it does not. Step sizes keep the paper's proportions:
    # training 5/8 of eps (5/255 at 8/255), test 1/4 of eps (2/255 at 8/255).
    eps="${DIGITS_EPS:-0.15}"
    : "${datasets:=Digits}" "${archs:=${DIGITS_ARCHS:-resnet18}}" "${methods:=${DIGITS_METHODS:-dense,joint,advmoe}}"
    : "${epochs:=${DIGITS_EPOCHS:-3}}" "${dense_ratios:=${DIGITS_DENSE_RATIOS:-0.25,0.125}}"
    : "${moe_ratio:=${DIGITS_MOE_RATIO:-0.125}}" "${n_expert:=${DIGITS_N_EXPERT:-2}}"
    : "${aa_n_ex:=${DIGITS_AA_N_EX:-32}}" "${aa_version:=${DIGITS_AA_VERSION:-custom}}"
    [ "$aa_version" != custom ] || : "${aa_attacks:=${DIGITS_AA_ATTACKS:-apgd-ce apgd-dlr}}"
    : "${aa_epsilon:=$(sw_calc "$eps * 255")}" "${save_dir:=results/digits_minisweep}"
    preset_args=(--epsilon "$eps" --step-size "$(sw_calc "$eps * 5 / 8")" --epsilon-test "$eps"
        --step-size-test "$(sw_calc "$eps / 4")" --batch-size "${DIGITS_BATCH_SIZE:-64}" --num-workers 0 --no-progress)
    # The per-epoch curves use one test batch (and one validation batch); the final --evaluate of
    # model_best uses the whole test set (this flag is not passed to it).
    train_only_args=(--max-test-batches "${DIGITS_EPOCH_TEST_BATCHES:-1}")
    aa_extra=(--num-workers 0 --no-progress)
    gres=""
    report_flags=(--compute-flops --title "Digits mini-sweep (eps $eps)")
    ;;
*) sw_die "unknown --preset $preset (paper or digits)" ;;
esac
case "$backend" in local | slurm) ;; *) sw_die "unknown --backend $backend (local or slurm)" ;; esac
[ -z "$gpus" ] || [ "$backend" = local ] || sw_die "--gpus is for the local backend (SLURM gives each task its GPU)"
if [ -n "$gpus" ]; then
    for g in $(sw_split_list "$gpus"); do
        [[ "$g" =~ ^[0-9]+$ ]] || sw_die "--gpus $gpus: each GPU is a device index (0,1,...), got $g"
    done
    [ -z "$(sw_split_list "$gpus" | sort | uniq -d)" ] || sw_die "--gpus $gpus names a GPU twice (two runs would share it)"
fi
[ -z "$aa_n_ex" ] || [[ "$aa_n_ex" =~ ^[1-9][0-9]*$ ]] || sw_die "--aa-n-ex must be a positive integer, got $aa_n_ex"
[[ "$epochs" =~ ^[1-9][0-9]*$ ]] || sw_die "--epochs must be a positive integer, got $epochs"
[ "$aa_version" = custom ] || [ -z "$aa_attacks" ] || sw_die "--aa-attacks needs --aa-version custom"
for flag in --exp-identifier --save-dir --resume --evaluate --arch --dataset --ratio --n-expert --moe-training \
    --epochs --seed; do
    for a in ${extra[@]+"${extra[@]}"}; do
        case "$a" in "$flag" | "$flag="*) sw_die "$flag after -- would break the sweep's naming; use the sweep's own option" ;; esac
    done
done

mkdir -p "$save_dir"
save_dir="$(cd "$save_dir" && pwd)"
if [ -n "$data_dir" ]; then
    [ -d "$data_dir" ] || sw_die "--data-dir $data_dir does not exist"
    data_dir="$(cd "$data_dir" && pwd)"
fi
: "${manifest:=$save_dir/manifest.tsv}"
: "${report_dir:=$save_dir/report}"

# ---- the runs -------------------------------------------------------------------------------------------
common=()
[ -z "$seed" ] || common+=(--seed "$seed")
[ -z "$data_dir" ] || common+=(--data-dir "$data_dir")
SW_TRAIN_CMDS=() SW_EVAL_BASES=() SW_RUN_DATASETS=()
add_run() { # add_run SCRIPT METHOD ARCH RATIO DATASET [MoE flags...]
    local script="$1" method="$2" arch="$3" ratio="$4" dataset="$5" base
    shift 5
    base="$(sw_quote "$SW_PYTHON" "$script.py" --dataset "$dataset" --arch "$arch" --ratio "$ratio" "$@" \
        --epochs "$epochs" --exp-identifier "${tag:+${tag}_}$method" --save-dir "$save_dir" \
        ${common[@]+"${common[@]}"} ${preset_args[@]+"${preset_args[@]}"})"
    SW_RUN_DATASETS+=("$dataset")
    SW_EVAL_BASES+=("$base$(sw_quote_prefixed ${extra[@]+"${extra[@]}"})")
    SW_TRAIN_CMDS+=("$base$(sw_quote_prefixed ${train_only_args[@]+"${train_only_args[@]}"} \
        ${extra[@]+"${extra[@]}"})")
}
for method in $(sw_split_list "$methods"); do
    case "$method" in dense | joint | advmoe | advmoe-reference) ;; *)
        sw_die "unknown method $method (dense, joint, advmoe, advmoe-reference)" ;;
    esac
done
for dataset in $(sw_split_list "$datasets"); do
    case "$dataset" in CIFAR10 | CIFAR100 | TinyImageNet | ImageNet | Digits) ;; *)
        sw_die "unknown dataset $dataset (CIFAR10, CIFAR100, TinyImageNet, ImageNet, Digits)" ;;
    esac
    for family in $(sw_split_list "$archs"); do
        base="$(sw_arch "$dataset" "$family")" || sw_die "unknown arch $family (resnet18, wrn_28_10, vgg16_bn, densenet or a full name)"
        for method in $(sw_split_list "$methods"); do
            case "$method" in
            dense)
                for r in $(sw_split_list "$dense_ratios"); do
                    add_run train_ori dense "${base}_ori" "$r" "$dataset"
                done
                ;;
            joint) add_run train_moe joint "${base}_moe" "$moe_ratio" "$dataset" --n-expert "$n_expert" --moe-training joint ;;
            advmoe) add_run train_moe advmoe "${base}_moe" "$moe_ratio" "$dataset" --n-expert "$n_expert" --moe-training advmoe ;;
            advmoe-reference)
                add_run train_moe advmoe-reference "${base}_moe" "$moe_ratio" "$dataset" --n-expert "$n_expert" \
                    --moe-training advmoe --router-objective reference ;;
            esac
        done
    done
done
[ "${#SW_TRAIN_CMDS[@]}" -gt 0 ] || sw_die "the filters leave no run"

SW_AA_CMD_ARGS=(--epsilon "$aa_epsilon" --version "$aa_version")
if [ -n "$aa_attacks" ]; then
    # shellcheck disable=SC2206
    SW_AA_CMD_ARGS+=(--attacks $aa_attacks)
fi
[ -z "$aa_n_ex" ] || SW_AA_CMD_ARGS+=(--n-ex "$aa_n_ex")
[ -z "$data_dir" ] || SW_AA_CMD_ARGS+=(--data-dir "$data_dir")
[ -z "$seed" ] || SW_AA_CMD_ARGS+=(--seed "$seed")
SW_AA_CMD_ARGS+=(${aa_extra[@]+"${aa_extra[@]}"})
[ "$SW_AA" = 0 ] || sw_check_aa_args ${SW_AA_CMD_ARGS[@]+"${SW_AA_CMD_ARGS[@]}"}

sw_write_manifest "$manifest"
total="$(sw_manifest_count "$manifest")"
sw_say "manifest: $manifest ($total runs, preset $preset, backend $backend${gpus:+ on GPUs $gpus})"

report_cmd="$(sw_quote "$SW_PYTHON" -m utils.tools.report "$save_dir" --manifest "$manifest" --out "$report_dir" \
    ${report_flags[@]+"${report_flags[@]}"})"

# ---- run ------------------------------------------------------------------------------------------------
if [ "$backend" = slurm ]; then
    sw_submit_slurm "$manifest" "$save_dir/sweep_slurm" "$dry_run" "$gres" "$max_parallel" "$sbatch_args" \
        "cd $(printf '%q' "$SW_ROOT") && $report_cmd"
    exit 0
fi
status=0
if [ "$dry_run" = 1 ]; then
    [ -z "$gpus" ] || sw_say "dry run: lines would be spread over GPUs $gpus (one run per GPU at a time)"
    sw_run_sequential "$manifest" 1 || status=$?
    sw_say "dry run: then $report_cmd"
    exit "$status"
fi
if [ -n "$gpus" ]; then
    sw_run_parallel "$manifest" "$gpus" "$save_dir/sweep_logs" || status=$?
else
    sw_run_sequential "$manifest" 0 || status=$?
fi
if [ "$report" = 1 ] && [ "$status" != "$SW_REQUEUE_EXIT" ]; then
    sw_say "report: $report_cmd"
    (cd "$SW_ROOT" && eval "$report_cmd") || status=$((status == 0 ? 1 : status))
fi
exit "$status"
