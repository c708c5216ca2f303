# The runtime settings of each speed configuration that bench/gpu_phases.sh and bench/gpu_session.sh name, as
# KEY=VALUE words for `isp run --set` (sourced by both).
speed_settings() {  # CONFIG -> its runtime settings
  case "$1" in
    eager_fp32)     echo 'runtime.device="cuda" runtime.cuda_graphs=false runtime.channels_last=false runtime.precision="fp32"' ;;
    eager_cl_bf16)  echo 'runtime.device="cuda" runtime.cuda_graphs=false runtime.channels_last=true runtime.precision="bf16"' ;;
    graphs_fp32)    echo 'runtime.device="cuda" runtime.cuda_graphs=true runtime.channels_last=false runtime.precision="fp32"' ;;
    graphs_cl_fp32) echo 'runtime.device="cuda" runtime.cuda_graphs=true runtime.channels_last=true runtime.precision="fp32"' ;;
    graphs_cl_bf16) echo 'runtime.device="cuda" runtime.cuda_graphs=true runtime.channels_last=true runtime.precision="bf16"' ;;
    # the defaults without BN folding: what the frozen networks' kept folds give (selector, gate learning)
    graphs_cl_bf16_unfolded) echo 'runtime.device="cuda" runtime.cuda_graphs=true runtime.channels_last=true runtime.precision="bf16" runtime.fold_batchnorm=false' ;;
    cpu_eager_fp32) echo 'runtime.device="cpu" runtime.cuda_graphs=false runtime.channels_last=false runtime.precision="fp32"' ;;
    # the CPU's defaults: fp32, channels_last "auto" (NHWC for networks with depthwise convolutions only)
    cpu_auto_fp32)  echo 'runtime.device="cpu" runtime.cuda_graphs=false runtime.precision="fp32"' ;;
    # cpu_before: isp as it was before BN folding and the allocator setting (bench/gpu_phases.sh also sets
    # ISP_GLIBC_MALLOC_DEFAULTS=1 for it).
    cpu_before|cpu_unfolded) echo 'runtime.device="cpu" runtime.cuda_graphs=false runtime.channels_last=false runtime.precision="fp32" runtime.fold_batchnorm=false' ;;
    cpu_bf16)       echo 'runtime.device="cpu" runtime.cuda_graphs=false runtime.channels_last=false runtime.precision="bf16"' ;;
    cpu_cl_fp32)    echo 'runtime.device="cpu" runtime.cuda_graphs=false runtime.channels_last=true runtime.precision="fp32"' ;;
    cpu_cl_bf16)    echo 'runtime.device="cpu" runtime.cuda_graphs=false runtime.channels_last=true runtime.precision="bf16"' ;;
    # X_aligned8: configuration X with every pruned width a multiple of 8 (PruneChannels' channel_multiple; this
    # changes the pruned architecture at the same FLOPs target, so only the finetuning row differs from X's);
    # cpu_aligned8 and cpu_cl_aligned8 are cpu_eager_fp32's and cpu_cl_fp32's.
    *_aligned8)
      local base="${1%_aligned8}" settings
      case "$base" in cpu) base=cpu_eager_fp32 ;; cpu_cl) base=cpu_cl_fp32 ;; esac
      settings=$(speed_settings "$base") || exit 2
      echo "$settings nodes.prune.channel_multiple=8" ;;
    *) echo "unknown configuration $1" >&2; exit 2 ;;
  esac
}
