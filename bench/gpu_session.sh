#!/usr/bin/env bash
# Everything docs/PERFORMANCE.md plans for a GPU session, in parts that each fit one 10-minute
# device call, every result written under $OUT (default runs/gpu_session):
#
#   bash bench/gpu_session.sh llama       # llama_1b: ours, m32, m16, b16 vs HF eager / compiled (~4 min)
#                                         # ours = attention auto, max_segments 32 fitted to the bench's rows
#                                         # (one document each: M 1): cuDNN packed layout; m32 / m16 = M fixed,
#                                         # b16 = batch 16 (other work a step: listed, not compared)
#   bash bench/gpu_session.sh attention   # bench/attention.py (documents per row, M), bench/mlp.py (~1 min)
#   bash bench/gpu_session.sh profile     # t5x-lite bench --profile on the three configs      (~2 min)
#                                         # (XLA's command buffers off while profiling: every kernel seen)
#   bash bench/gpu_session.sh llama_more  # llama_1b: remat full, full logits, autotune 1, graphs of while loops (~3 min)
#   bash bench/gpu_session.sh unroll      # ours only: llama, t5, bert with the layers as straight code, a profile (~8 min)
#   bash bench/gpu_session.sh scan_flags  # ours: the scan's copies without unrolling (XLA flags); llama vs HF compiled (~7 min)
#   bash bench/gpu_session.sh shipped     # the shipped configs vs the baseline each target names, fewest rows (~9 min)
#   bash bench/gpu_session.sh t5          # t5_base: one encoder layer's attention with the relative bias's gradient
#                                         # from cuDNN / the Pallas kernel (tilings); ours, pallas_bias vs HF
#                                         # compiled (~8 min: unrolled layers' first steps)
#   bash bench/gpu_session.sh pallas_kernel  # one llama_1b layer: cuDNN against jax's Pallas attention (~1.5 min)
#   bash bench/gpu_session.sh pallas      # llama_1b: ours, attention=pallas scanned / unrolled (~5 min; run when the
#                                         # pallas_kernel rows come near cudnn_packed)
#   bash bench/gpu_session.sh bert        # bert_base: ours, packed1, rbg, fused q/k/v vs HF eager (~6 min)
#   bash bench/gpu_session.sh decode      # llama_1b generate, batch 1 and 32: layers unrolled (own weights) / scanned,
#                                         # stop checks every 8 / 32 tokens (loops of known length), float32
#                                         # weights, and a profile per generated token at batch 1 (~6 min)
#   bash bench/gpu_session.sh moe         # moe_1b (8 experts, top-2) vs HF Mixtral; capacity, groups; decode (~8 min)
#   bash bench/gpu_session.sh serve       # llama_1b behind t5x-lite serve: 32 clients, max batch 1 / 8 / 32
#                                         # (~3 min, mostly compiling each batch shape; not yet run)
#   bash bench/gpu_session.sh report      # no GPU: issue 8's targets against what is in $OUT (bench/gpu_report.py)
#
# For a session of 15 minutes of device time (2026-12), shorter parts, in that order of value:
#   bash bench/gpu_session.sh decode_short   # llama_1b generate as shipped, batch 1 and 32 (~2.5 min)
#   bash bench/gpu_session.sh llama_fit      # llama_1b as shipped (fit_max_segments: the bench's one-document
#                                            # rows -> M 1), zero_fill (the scan's stacks zero-filled), m32
#                                            # (session 8's fixed M 32) vs HF compiled (~4.5 min)
#   bash bench/gpu_session.sh t5_kernel      # T5's bias gradient, one layer and kernel tilings; then t5_base with
#                                            # its layers scanned (first steps ~35 s, not ~150), cuDNN's gradient
#                                            # against the Pallas kernel's, ours only (~3 min)
#   bash bench/gpu_session.sh pallas_kernel  # (above, ~1.5 min)
#
# In that order of value when device time is short. The first GPU session (H100, 2026-11-23:
# docs/gpu_runs/2026-11-23-h100) ran llama, decode, t5_bert, attention and a broken profile (graphs
# hid the kernels); the times above are what it took, model compile included.
#
# SMOKE=1 runs the same parts at CPU sizes (what tests/test_bench.py covers piece by piece).
# On the device machine: `pip install --no-deps -e .` (or PYTHONPATH=.) first; the script sets
# XLA_PYTHON_CLIENT_PREALLOCATE=false because torch and JAX take turns on the GPU.
set -uo pipefail  # not -e: a failing command (an HF baseline that OOMs) must not stop the next ones
failed=0
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-runs/gpu_session}
mkdir -p "$OUT"
SMOKE_FLAG=() SMOKE_SET=()
if [[ ${SMOKE:-0} == 1 ]]; then
  SMOKE_FLAG=(--smoke)
  SMOKE_SET=(--set model.d_model=64 --set model.num_layers=2 --set model.num_heads=4 --set model.num_kv_heads=4
             --set model.head_dim=16 --set model.d_ff=128 --set model.vocab_size=512 --set data.seq_len=64
             --set train.batch_size=4 --set model.dtype=float32)
fi
STEPS=(--steps "${STEPS:-10}" --warmup "${WARMUP:-3}")

# Several parts in one call: `bash bench/gpu_session.sh profile llama decode`, each in its own run of
# this script; DEADLINE_S=570 gives them that many seconds in all (a part is cut at the deadline and
# the next ones skipped when under 45 s are left), and BUNDLE=FILE.tgz packs $OUT's results (not the
# profile traces) into one file at the end, for a device call that brings back few files.
if [[ -z ${GPU_SESSION_PART:-} ]] && { (( $# > 1 )) || [[ -n ${DEADLINE_S:-} || -n ${BUNDLE:-} ]]; }; then
  start=$SECONDS
  for part in "$@"; do
    left=$(( ${DEADLINE_S:-100000} - (SECONDS - start) - 10 ))
    if (( left < 45 )); then echo "gpu_session: $part skipped (${left}s left)" >&2; failed=1; continue; fi
    echo "gpu_session: $part ($(date -u +%T), ${left}s left)" >&2
    GPU_SESSION_PART=1 timeout -k 5 "$left" bash "$0" "$part" 2>&1 | tee "$OUT/$part.log" || failed=1
  done
  if [[ -n ${BUNDLE:-} ]]; then
    tar czf "$BUNDLE" --exclude='profile_*/*/*' -C "$(dirname "$OUT")" "$(basename "$OUT")" || failed=1
    echo "gpu_session: results bundled in $BUNDLE" >&2
  fi
  exit $failed
fi

part=${1:-}
case $part in
  attention)
    # documents per row / M of the packed layout: 1/1 (cuDNN's padded kernel), 1/2 (what max_segments=1
    # runs), 4/4, 4/16, 4/64 (does cuDNN's cost grow with M?)
    shapes="1:1 1:2 4:4 4:16 4:64"
    [[ ${SMOKE:-0} == 1 ]] && shapes="1:2 4:16"  # CPU: the code paths, not the trend
    for segments_m in $shapes; do
      segments=${segments_m%:*} m=${segments_m#*:}
      python bench/attention.py "${SMOKE_FLAG[@]}" --segments "$segments" --max-segments "$m" \
        --json "$OUT/attention_seg${segments}_m$m.json" | tee "$OUT/attention_seg${segments}_m$m.txt" || failed=1
    done
    # the SwiGLU MLP of one layer against its bare GEMMs; then with cuBLAS for every GEMM (CPU: the latter only)
    if [[ ${SMOKE:-0} != 1 ]]; then
      python bench/mlp.py --json "$OUT/mlp.json" | tee "$OUT/mlp.txt" || failed=1
    fi
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" python bench/mlp.py "${SMOKE_FLAG[@]}" \
      --json "$OUT/mlp_cublas.json" | tee "$OUT/mlp_cublas.txt" || failed=1 ;;
  decode_short)  # decoding as shipped (layers unrolled from their own weights, session 9): issue 8's two targets
    python bench/decode.py "${SMOKE_FLAG[@]}" --json "$OUT/decode.json" | tee "$OUT/decode.txt" || failed=1 ;;
  llama_fit)  # llama_1b as shipped against HF compiled: model.fit_max_segments finds the one document each bench
    # row holds, given to cuDNN as a length a row (session 7's M 1 ran the packed layout's 2 slots: 194.7 ms a step,
    # against ~202 at M 32 in session 8); m32 keeps the cap of 32; zero_fill (session 14) lets XLA zero-fill the
    # scan's stacked outputs as before train.xla_options' DUS-accumulator pass (H100 compiled offline: +4.5 ms a step;
    # the first step's loss must equal the shipped row's)
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads llama --impls ours,hf_compile "${STEPS[@]}" \
      --variant zero_fill:train.xla_options= \
      --variant m32:model.fit_max_segments=false \
      --json "$OUT/llama.json" | tee "$OUT/llama.txt" || failed=1 ;;
  t5_kernel)  # t5_base's relative-bias gradient: cuDNN's over the [B, N, T, S] bias + mask (shipped), session 10's
    # Pallas kernel, and (session 12) rows of one document given to cuDNN as lengths with the [1, N, T, S] bias as it
    # is (model.max_segments 1: the bench's rows). Most telling first: one encoder layer on rows of one document, then
    # the whole step with the layers scanned (what a layer saves is the same unrolled; the scan's first step builds 6
    # cuDNN calls, not 72), then the layer on rows of 4 documents with the Pallas kernel's tilings. one_doc_nomerge
    # (session 13): XLA's dot merger off, which joins T5's q and k projections into one GEMM and then copies each
    # half out for cuDNN (H100 compiled offline: -1.8 ms a step scanned, -2.1 unrolled)
    python bench/attention.py "${SMOKE_FLAG[@]}" --t5 --segments 1 --bias-blocks "" --json "$OUT/attention_t5_1doc.json" \
      | tee "$OUT/attention_t5_1doc.txt" || failed=1
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads t5 --impls ours "${STEPS[@]}" --set model.scan_unroll=1 \
      --variant one_doc:model.max_segments=1 \
      --variant pallas_bias:model.attention_bias_grad=pallas \
      --variant one_doc_nomerge:model.max_segments=1,train.xla_options=xla_gpu_dot_merger_threshold_mb=0 \
      --json "$OUT/t5_scan.json" | tee "$OUT/t5_scan.txt" || failed=1
    python bench/attention.py "${SMOKE_FLAG[@]}" --t5 --json "$OUT/attention_t5.json" \
      | tee "$OUT/attention_t5.txt" || failed=1 ;;
  llama)
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads llama "${STEPS[@]}" \
      --variant m32:model.fit_max_segments=false \
      --variant m16:model.max_segments=16,model.fit_max_segments=false \
      --variant b16:train.batch_size=16 \
      --json "$OUT/llama.json" | tee "$OUT/llama.txt" || failed=1 ;;
  llama_more)  # ours only: its "ours" row ties these to the llama part's HF rows
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads llama --impls ours "${STEPS[@]}" \
      --variant remat_full:model.remat=full \
      --variant nochunk:train.loss_chunk=0 \
      --variant autotune1:XLA_FLAGS=--xla_gpu_autotune_level=1 \
      --variant graphs:XLA_FLAGS=--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL \
      --json "$OUT/llama_more.json" | tee "$OUT/llama_more.txt" || failed=1 ;;
  unroll)  # ours only: the layer scan against straight code (2026-11-23 profile: stacking the scan's
    # residuals and gradients, dynamic-update-slice, dynamic-slice and zero-filled buffers, took 29-30% of
    # t5_base's and bert_base's step and 8% of llama_1b's), with the full logits and without remat
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads llama --impls ours "${STEPS[@]}" \
      --variant unroll:model.scan_unroll=16 \
      --variant unroll_nochunk:model.scan_unroll=16,train.loss_chunk=0 \
      --variant unroll_nochunk_noremat:model.scan_unroll=16,train.loss_chunk=0,model.remat=none \
      --variant unroll_nochunk_m32:model.scan_unroll=16,train.loss_chunk=0,model.fit_max_segments=false \
      --json "$OUT/llama_unroll.json" | tee "$OUT/llama_unroll.txt" || failed=1
    for w in t5 bert; do
      python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads $w --impls ours "${STEPS[@]}" \
        --variant unroll:model.scan_unroll=12 \
        --variant unroll_fused:model.scan_unroll=12,model.fused_qkv=true \
        --json "$OUT/${w}_unroll.json" | tee "$OUT/${w}_unroll.txt" || failed=1
    done
    python -m t5x_lite bench --config configs/llama_1b.yaml --steps 5 --warmup 2 --profile "$OUT/profile_llama_unrolled" \
      --set model.scan_unroll=16 --set train.loss_chunk=0 "${SMOKE_SET[@]}" --json "$OUT/profile_llama_unrolled.json" \
      2>&1 | tee "$OUT/profile_llama_unrolled.txt" || failed=1 ;;
  scan_flags)  # the layer scan's stacking copies gone without unrolling (one cuDNN build per stack)? XLA's
    # cuBLAS calls reading / writing slices of the stacked buffers in place, and its double-buffered while
    # loops; the launchers' flags (t5x_lite/xla_flags.py) on one GPU; llama_1b with its HF compiled
    # baseline in the same run (session 8 ran out of time before it)
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads llama --impls ours,hf_compile "${STEPS[@]}" \
      --variant dsf:XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true \
      --variant dbuf:XLA_FLAGS=--xla_gpu_enable_while_loop_double_buffering=true \
      --variant unroll:model.scan_unroll=16 \
      --variant "launcher:XLA_FLAGS=$(python -m t5x_lite.xla_flags)" \
      --json "$OUT/llama_scan.json" | tee "$OUT/llama_scan.txt" || failed=1
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads bert --impls ours "${STEPS[@]}" \
      --variant scan:model.scan_unroll=1 \
      --variant scan_dsf:model.scan_unroll=1,XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true \
      --variant scan_dbuf:model.scan_unroll=1,XLA_FLAGS=--xla_gpu_enable_while_loop_double_buffering=true \
      --json "$OUT/bert_scan.json" | tee "$OUT/bert_scan.txt" || failed=1 ;;
  shipped)  # the shipped configs against the baseline each target names, fewest rows (one device call):
    # bert_base vs HF eager (and its layer scan), t5_base vs HF compiled, llama_1b vs HF compiled
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads bert --impls ours,hf "${STEPS[@]}" \
      --variant scan:model.scan_unroll=1 --json "$OUT/bert_shipped.json" | tee "$OUT/bert_shipped.txt" || failed=1
    for w in t5 llama; do
      python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads $w --impls ours,hf_compile "${STEPS[@]}" \
        --json "$OUT/${w}_shipped.json" | tee "$OUT/${w}_shipped.txt" || failed=1
    done ;;
  t5)  # t5_base's layers are unrolled since session 8: each row's first step is ~150 s (cuDNN builds).
    # fit: the bench's rows of one document given to cuDNN as lengths, the [1, N, T, S] bias as it is (session 12).
    # The relative bias's gradient: cuDNN's (shipped) against the Pallas kernel's (session 10), first
    # one encoder layer and the kernel's tilings (~1 min), then the whole step beside HF compiled
    python bench/attention.py "${SMOKE_FLAG[@]}" --t5 --json "$OUT/attention_t5.json" \
      | tee "$OUT/attention_t5.txt" || failed=1
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads t5 --impls ours,hf_compile "${STEPS[@]}" \
      --variant fit:model.fit_max_segments=true \
      --variant pallas_bias:model.attention_bias_grad=pallas \
      --json "$OUT/t5.json" | tee "$OUT/t5.txt" || failed=1 ;;
  pallas_kernel)  # one llama_1b layer's attention, cuDNN's rows beside jax's Pallas kernel (session 10): one
    # document a row (cuDNN's M 1) and four with the shipped M 32
    for segments_m in 1:1 4:32; do
      segments=${segments_m%:*} m=${segments_m#*:}
      python bench/attention.py "${SMOKE_FLAG[@]}" --segments "$segments" --max-segments "$m" \
        --json "$OUT/attention_pallas_seg${segments}_m$m.json" | tee "$OUT/attention_pallas_seg${segments}_m$m.txt" \
        || failed=1
    done ;;
  pallas)  # llama_1b with jax's Pallas flash attention (documents inside the kernel, no M; session 10): scanned,
    # and unrolled, whose first step has no cuDNN graph to build per layer (66 s with cuDNN, target 30 s)
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads llama --impls ours "${STEPS[@]}" \
      --variant pallas:model.attention=pallas \
      --variant pallas_unroll:model.attention=pallas,model.scan_unroll=16,train.loss_chunk=0 \
      --json "$OUT/llama_pallas.json" | tee "$OUT/llama_pallas.txt" || failed=1 ;;
  bert)
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads bert --impls ours,hf "${STEPS[@]}" \
      --variant packed1:model.max_segments=1 \
      --variant rbg:train.dropout_rng=rbg \
      --variant fused_qkv:model.fused_qkv=true \
      --json "$OUT/bert.json" | tee "$OUT/bert.txt" || failed=1 ;;
  profile)  # where each config's step goes: model parts, forward / backward, costliest instructions
    for config in llama_1b t5_base bert_base; do
      python -m t5x_lite bench --config "configs/$config.yaml" --steps 5 --warmup 2 --profile "$OUT/profile_$config" \
        "${SMOKE_SET[@]}" --json "$OUT/profile_$config.json" 2>&1 | tee "$OUT/profile_$config.txt" || failed=1
    done ;;
  decode)
    # llama_1b decodes its 16 layers unrolled (model.decode_scan_unroll: 16), since session 9 from each layer's
    # own weights (split out of the stacks once a call; the offline H100 compile put the stacked slices'
    # copies at 2.2 GB a token) in the compute dtype; scan = the layer scan kept (stacked weights, as before)
    python bench/decode.py "${SMOKE_FLAG[@]}" --variant scan:model.decode_scan_unroll=1 \
      --variant stop8:model.decode_stop_every=8 --variant stop32:model.decode_stop_every=32 \
      --json "$OUT/decode.json" | tee "$OUT/decode.txt" || failed=1
    # float32 weights, as training stores them: cast once a call now (they were converted every token)
    python bench/decode.py "${SMOKE_FLAG[@]}" --param-dtype float32 --variant scan:model.decode_scan_unroll=1 \
      --json "$OUT/decode_f32.json" | tee "$OUT/decode_f32.txt" || failed=1
    # kernel by kernel, per generated token at batch 1 (graphs off: its own process, its own file, which
    # gpu_report does not read as timings): instruction time and runs against the timed step
    python bench/decode.py "${SMOKE_FLAG[@]}" --batch-sizes 1 --repeats 1 --profile "$OUT/profile_decode" \
      --json "$OUT/profile_decode.json" 2>&1 | tee "$OUT/profile_decode.txt" || failed=1 ;;
  moe)  # beyond issue 8's targets: a mixture of experts against transformers' Mixtral (dropless)
    python bench/train_vs_hf.py "${SMOKE_FLAG[@]}" --workloads moe "${STEPS[@]}" \
      --variant dropless:model.expert_capacity_factor=0 \
      --variant cf2:model.expert_capacity_factor=2 \
      --variant g512:model.expert_group_size=512 \
      --variant g128:model.expert_group_size=128 \
      --json "$OUT/moe.json" | tee "$OUT/moe.txt" || failed=1
    if [[ ${SMOKE:-0} != 1 ]]; then  # decoding: batch 1 gathers each token's 2 experts, batch 32 runs all 8
      python bench/decode.py --config configs/moe_1b.yaml --json "$OUT/decode_moe.json" \
        | tee "$OUT/decode_moe.txt" || failed=1
    fi ;;
  serve)  # beyond issue 8: t5x-lite serve under 32 concurrent clients, batched against one request at a time
    python bench/serve.py "${SMOKE_FLAG[@]}" --clients 32 --requests 2 --new-tokens 64 --max-batch-sizes 1,8,32 \
      --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.txt" || failed=1 ;;
  report)
    python bench/gpu_report.py "$OUT" --json "$OUT/report.json" | tee "$OUT/report.md" || failed=1 ;;
  *)
    echo "usage: $0 PART [PART...] with PART decode_short|llama_fit|t5_kernel|llama|attention|profile|llama_more|unroll|scan_flags|shipped|t5|pallas_kernel|pallas|bert|decode|moe|serve|report" >&2
    echo "       (env: OUT, SMOKE=1, STEPS, WARMUP, DEADLINE_S, BUNDLE)" >&2
    exit 2 ;;
esac
echo "gpu_session: $part done; results in $OUT$( ((failed)) && echo ' (a command failed: see its output above)')" >&2
exit $failed
