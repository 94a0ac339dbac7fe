# Shared by the *_pod*.sh launchers (sourced, not run): read the pod's hosts, then start the training script with
# torchrun (GPUs, HPUs), the legacy `python -m torch.distributed.launch` (HPUs, LAUNCHER=launch) or poprun (IPUs).
#
#   --hosts H1,H2,...      the pod's hosts, required (GPU/HPU: one per node of 8 accelerators; IPU: poprun's hosts)
#   --rdzv HOST[:PORT]     torchrun's rendezvous (default: the first host, port 29500)
#   --vipu_server HOST     IPU only: the V-IPU controller (default $VIPU_SERVER, else poprun's own default)
#   --vipu_partition NAME  IPU only: the IPU partition (default $PARTITION, else poprun's own default)
#   anything else          passed to the training script (e.g. --data_path, --output_dir)
# Environment: DEVICE=gpu (default) | hpu | ipu; LAUNCHER=torchrun (default) | launch; PROCS_PER_NODE (8);
# NODE_RANK (legacy launcher; default: this host's place in --hosts); PYTHON (python3); DRY_RUN=1 prints the
# command instead of running it.

die() {
    echo "error: $*" >&2
    exit 2
}

# pod_launch SCRIPT CONFIG ACCELERATORS IPUS_PER_REPLICA [ARGS...]; IPUS_PER_REPLICA 0: no IPU configuration.
pod_launch() {
    local script=$1 config=$2 accelerators=$3 ipus_per_replica=$4
    shift 4
    local name hosts="" rdzv="" vipu_server=${VIPU_SERVER:-} vipu_partition=${PARTITION:-} extra=()
    name=$(basename "$0")
    while (($#)); do
        case $1 in
            --hosts=*) hosts=${1#*=} ;;
            --rdzv=*) rdzv=${1#*=} ;;
            --vipu_server=*) vipu_server=${1#*=} ;;
            --vipu_partition=*) vipu_partition=${1#*=} ;;
            --hosts | --rdzv | --vipu_server | --vipu_partition)
                (($# > 1)) || die "$1 needs a value: $name $1 VALUE"
                set -- "$1=$2" "${@:3}"
                continue ;;
            *) extra+=("$1") ;;
        esac
        shift
    done
    [[ -n $hosts ]] || die "$name needs the pod's hosts: pass --hosts HOST1,HOST2,... (see the top of $name)"
    local host_list
    IFS=, read -ra host_list <<< "$hosts"
    local python=${PYTHON:-python3} cmd repo
    repo=$(cd "$(dirname "$0")/.." && pwd)
    script=$repo/$script
    case ${DEVICE:-gpu} in
        gpu | hpu)
            local per_node=${PROCS_PER_NODE:-8}
            local nnodes=$((accelerators / per_node))
            ((${#host_list[@]} == nnodes)) || die "$name runs $accelerators processes as $nnodes nodes x $per_node," \
                "but --hosts lists ${#host_list[@]}: give $nnodes hosts (or set PROCS_PER_NODE)"
            [[ -n $rdzv ]] || rdzv=${host_list[0]}
            [[ $rdzv == *:* ]] || rdzv=$rdzv:29500
            local device_args=()
            [[ ${DEVICE:-gpu} == hpu ]] && device_args=(--device hpu)
            if [[ ${LAUNCHER:-torchrun} == launch ]]; then
                local rank=${NODE_RANK:-} i
                for i in "${!host_list[@]}"; do
                    [[ -z $rank && ${host_list[$i]} == "$(hostname)" ]] && rank=$i
                    [[ -z $rank && ${host_list[$i]} == "$(hostname -s)" ]] && rank=$i
                done
                [[ -n $rank ]] || die "this host ($(hostname)) is not in --hosts: set NODE_RANK to its place (0-based)"
                cmd=("$python" -m torch.distributed.launch --nnodes "$nnodes" --node_rank "$rank"
                     --nproc_per_node "$per_node" --master_addr "${rdzv%:*}" --master_port "${rdzv##*:}")
            else
                cmd=("${TORCHRUN:-torchrun}" --nnodes "$nnodes" --nproc_per_node "$per_node" --rdzv_backend c10d
                     --rdzv_endpoint "$rdzv" --rdzv_id "$config")
            fi
            cmd+=("$script" --config "$config" "${device_args[@]}" "${extra[@]}") ;;
        ipu)
            ((ipus_per_replica > 0)) || die "$(basename "$script") has no IPU training step: run $name on GPUs or" \
                "HPUs (DEVICE=gpu|hpu)"
            local replicas=$((accelerators / ipus_per_replica)) instances=${#host_list[@]}
            ((replicas % instances == 0)) || die "$replicas replicas cannot be shared by ${#host_list[@]} hosts:" \
                "give a number of hosts dividing $replicas"
            cmd=(poprun --host "$hosts" --num-instances "$instances" --num-replicas "$replicas"
                 --ipus-per-replica "$ipus_per_replica")
            [[ -n $vipu_server ]] && cmd+=(--vipu-server-host "$vipu_server")
            [[ -n $vipu_partition ]] && cmd+=(--vipu-partition "$vipu_partition")
            cmd+=(--mpi-local-args="-x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x POPLAR_ENGINE_OPTIONS"
                  "$python" "$script" --config "${config}_ipu" --replication_factor "$replicas" "${extra[@]}") ;;
        *) die "DEVICE=${DEVICE} is not a pod device: use gpu, hpu or ipu" ;;
    esac
    if [[ -n ${DRY_RUN:-} ]]; then
        printf '%q ' "${cmd[@]}"
        echo
    else
        exec "${cmd[@]}"
    fi
}
