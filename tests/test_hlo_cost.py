"""The static cost model of compiled programs (t5x_lite/hlo_cost.py): kernels, bytes, FLOPs."""

import jax
import jax.numpy as jnp
import pytest

from t5x_lite import hlo_cost

# A compiled GPU module's shapes of text (XLA 0.11): a layer loop of known trip count whose body
# runs a Triton GEMM, writes its result into a stacked buffer in place (an asynchronous fusion),
# reads one layer of another stacked buffer, and calls cuDNN's causal attention and its backward.
MODULE = """HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[4,8,16]{2,1,0})->f32[]}

%gemm_computation (parameter_0: bf16[32,64], parameter_1: bf16[64,128]) -> bf16[32,128] {
  %parameter_0 = bf16[32,64]{1,0} parameter(0)
  %parameter_1 = bf16[64,128]{1,0} parameter(1)
  ROOT %dot.1 = bf16[32,128]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dus (param_0: bf16[4,32,128], param_1: s32[], param_2: bf16[32,128]) -> bf16[4,32,128] {
  %param_0 = bf16[4,32,128]{2,1,0} parameter(0)
  %param_2 = bf16[32,128]{1,0} parameter(2)
  %bitcast.2 = bf16[1,32,128]{2,1,0} bitcast(%param_2)
  %param_1 = s32[] parameter(1)
  %constant_0 = s32[] constant(0)
  ROOT %dynamic-update-slice.3 = bf16[4,32,128]{2,1,0} dynamic-update-slice(%param_0, %bitcast.2, %param_1, %constant_0, %constant_0)
}

%fused_ds (param_0.1: f32[4,32,64], param_1.1: s32[]) -> bf16[32,64] {
  %param_0.1 = f32[4,32,64]{2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %constant_1 = s32[] constant(0)
  %dynamic-slice.4 = f32[1,32,64]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_1, %constant_1), dynamic_slice_sizes={1,32,64}
  %bitcast.5 = f32[32,64]{1,0} bitcast(%dynamic-slice.4)
  ROOT %convert.6 = bf16[32,64]{1,0} convert(%bitcast.5)
}

%body (p: (s32[], f32[4,32,64], bf16[4,32,128], bf16[64,128], bf16[2,16,4,8])) -> (s32[], f32[4,32,64], bf16[4,32,128], bf16[64,128], bf16[2,16,4,8]) {
  %p = (s32[], f32[4,32,64]{2,1,0}, bf16[4,32,128]{2,1,0}, bf16[64,128]{1,0}, bf16[2,16,4,8]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %stack = f32[4,32,64]{2,1,0} get-tuple-element(%p), index=1
  %out = bf16[4,32,128]{2,1,0} get-tuple-element(%p), index=2
  %w = bf16[64,128]{1,0} get-tuple-element(%p), index=3
  %q = bf16[2,16,4,8]{3,2,1,0} get-tuple-element(%p), index=4
  %loop_dynamic_slice_fusion = bf16[32,64]{1,0} fusion(%stack, %i), kind=kLoop, calls=%fused_ds, metadata={op_name="jit(step)/layers/mlp/dynamic_slice"}
  %gemm_fusion_dot.7 = bf16[32,128]{1,0} fusion(%loop_dynamic_slice_fusion, %w), kind=kCustom, calls=%gemm_computation, metadata={op_name="jit(step)/layers/mlp/wi_0/dot_general"}, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %fusion-start.8 = ((bf16[4,32,128]{2,1,0}, s32[], bf16[32,128]{1,0}), bf16[4,32,128]{2,1,0}, u32[]) fusion-start(%out, %i, %gemm_fusion_dot.7), kind=kLoop, calls=%fused_dus
  %fusion-done.8 = bf16[4,32,128]{2,1,0} fusion-done(%fusion-start.8)
  %attention_fwd.9 = (bf16[2,16,4,8]{3,2,1,0}, f32[2,4,16]{2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(step)/layers/self_attention/dot_product_attention_fwd"}, backend_config={"cudnn_fmha_backend_config": {"mask_type": "CAUSAL"}}
  %attention_bwd.10 = (bf16[2,16,4,8]{3,2,1,0}, bf16[2,16,4,8]{3,2,1,0}, bf16[2,16,4,8]{3,2,1,0}, u8[0]{0}) custom-call(%q, %q, %q), custom_call_target="__cudnn$fmhaSoftmaxBackward", backend_config={"cudnn_fmha_backend_config":{"mask_type":"NO_MASK"}}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,32,64]{2,1,0}, bf16[4,32,128]{2,1,0}, bf16[64,128]{1,0}, bf16[2,16,4,8]{3,2,1,0}) tuple(%next, %stack, %fusion-done.8, %w, %q)
}

%cond (p.1: (s32[], f32[4,32,64], bf16[4,32,128], bf16[64,128], bf16[2,16,4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,32,64]{2,1,0}, bf16[4,32,128]{2,1,0}, bf16[64,128]{1,0}, bf16[2,16,4,8]{3,2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %four = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %four), direction=LT
}

ENTRY %main (a: f32[4,32,64], b: bf16[4,32,128], w: bf16[64,128], q: bf16[2,16,4,8]) -> bf16[4,32,128] {
  %a = f32[4,32,64]{2,1,0} parameter(0)
  %b = bf16[4,32,128]{2,1,0} parameter(1)
  %w.1 = bf16[64,128]{1,0} parameter(2)
  %q.1 = bf16[2,16,4,8]{3,2,1,0} parameter(3)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,32,64]{2,1,0}, bf16[4,32,128]{2,1,0}, bf16[64,128]{1,0}, bf16[2,16,4,8]{3,2,1,0}) tuple(%zero, %a, %b, %w.1, %q.1)
  %while = (s32[], f32[4,32,64]{2,1,0}, bf16[4,32,128]{2,1,0}, bf16[64,128]{1,0}, bf16[2,16,4,8]{3,2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"},"known_init_step":{"init":"0","step":"1"}}
  ROOT %result = bf16[4,32,128]{2,1,0} get-tuple-element(%while), index=2
}
"""


def by_name(costs):
    return {c.name: c for c in costs}


def test_kernels_and_their_runs():
    costs = by_name(hlo_cost.kernel_costs(MODULE))
    # launched: the slice, the GEMM, the async update (its start), both attention calls, the
    # counter's add (body, 4 runs) and the condition's compare (5 runs); tuples, parameters,
    # bitcasts, constants and the done half of the async pair launch nothing
    assert set(costs) == {"loop_dynamic_slice_fusion", "gemm_fusion_dot.7", "fusion-start.8", "attention_fwd.9",
                          "attention_bwd.10", "next", "lt"}
    assert {n: c.runs for n, c in costs.items()} == {"loop_dynamic_slice_fusion": 4, "gemm_fusion_dot.7": 4,
                                                     "fusion-start.8": 4, "attention_fwd.9": 4,
                                                     "attention_bwd.10": 4, "next": 4, "lt": 5}


def test_bytes_count_slices_and_in_place_updates():
    costs = by_name(hlo_cost.kernel_costs(MODULE))
    # the slice fusion reads one layer of the f32 stack (32 x 64 x 4) and writes it as bf16, not the whole stack
    assert costs["loop_dynamic_slice_fusion"].bytes == 32 * 64 * 4 + 4 + 32 * 64 * 2
    # the in-place update reads its source (32 x 128 bf16) and the index, writes the update only
    assert costs["fusion-start.8"].bytes == 32 * 128 * 2 + 4 + 32 * 128 * 2
    assert costs["fusion-start.8"].kind == "copies: updates of stacked buffers"
    # a GEMM reads both operands and writes its result
    assert costs["gemm_fusion_dot.7"].bytes == (32 * 64 + 64 * 128 + 32 * 128) * 2


def test_a_slice_seen_through_a_bitcast_reads_the_slice():
    """Decoding's layer weights: a fusion that bitcasts a stacked parameter, then slices one layer."""
    text = MODULE.replace(
        "%dynamic-slice.4 = f32[1,32,64]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_1, %constant_1)",
        "%view = f32[4,32,64]{2,1,0} bitcast(%param_0.1)\n"
        "  %dynamic-slice.4 = f32[1,32,64]{2,1,0} dynamic-slice(%view, %param_1.1, %constant_1, %constant_1)")
    assert "%view" in text
    assert by_name(hlo_cost.kernel_costs(text))["loop_dynamic_slice_fusion"].bytes == 32 * 64 * 4 + 4 + 32 * 64 * 2
    # read whole when anything else uses it
    whole = text.replace("ROOT %convert.6 = bf16[32,64]{1,0} convert(%bitcast.5)",
                         "%other = f32[4,32,64]{2,1,0} negate(%view)\n  ROOT %convert.6 = bf16[32,64]{1,0} convert(%bitcast.5)")
    assert by_name(hlo_cost.kernel_costs(whole))["loop_dynamic_slice_fusion"].bytes == 4 * 32 * 64 * 4 + 4 + 32 * 64 * 2


def test_a_cache_updated_then_sliced_reads_the_slice():
    """A decoding step's fusion: write this token into the stacked cache, read one layer back."""
    text = MODULE.replace(
        "%dynamic-slice.4 = f32[1,32,64]{2,1,0} dynamic-slice(%param_0.1, %param_1.1, %constant_1, %constant_1)",
        "%new = f32[1,1,64]{2,1,0} broadcast(%constant_1)\n"
        "  %updated = f32[4,32,64]{2,1,0} dynamic-update-slice(%param_0.1, %new, %param_1.1, %constant_1, %constant_1)\n"
        "  %dynamic-slice.4 = f32[1,32,64]{2,1,0} dynamic-slice(%updated, %param_1.1, %constant_1, %constant_1)")
    assert "%updated" in text
    assert by_name(hlo_cost.kernel_costs(text))["loop_dynamic_slice_fusion"].bytes == 32 * 64 * 4 + 4 + 32 * 64 * 2


def test_flops_of_gemms_and_attention():
    costs = by_name(hlo_cost.kernel_costs(MODULE))
    assert costs["gemm_fusion_dot.7"].kind == "matmul"
    assert costs["gemm_fusion_dot.7"].flops == 2 * 32 * 128 * 64
    # q [B 2, T 16, N 4, H 8]: 4 B N T S H, half under the causal mask; backward 2.5x the full count
    full = 4 * 2 * 4 * 16 * 16 * 8
    assert costs["attention_fwd.9"].flops == full / 2
    assert costs["attention_bwd.10"].flops == 2.5 * full
    assert costs["attention_fwd.9"].kind == "attention (cuDNN)"


# GEMMs handed to cuBLAS (what XLA emits where its autotuner, or xla_gpu_enable_triton_gemm=false,
# picks the library): one alone, one in a dynamic-slice fusion reading one layer of a stacked
# weight in place; both return cuBLAS's workspace beside their result. And the uninitialised
# buffer XLA's DUS-accumulator pass puts where a scan's stacked outputs were zero-filled.
CUBLAS_MODULE = """HloModule jit_step, is_scheduled=true

%dsf (p0: bf16[4,64,128], p1: s32[], p2: bf16[32,64]) -> (bf16[32,128], s8[1024]) {
  %p0 = bf16[4,64,128]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = bf16[32,64]{1,0} parameter(2)
  %c0 = s32[] constant(0)
  %ds = bf16[1,64,128]{2,1,0} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,64,128}
  %bc = bf16[64,128]{1,0} bitcast(%ds)
  ROOT %gemm.1 = (bf16[32,128]{1,0}, s8[1024]{0}) custom-call(%p2, %bc), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/layers/mlp/wi_0/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
}

ENTRY %main (w: bf16[4,64,128], x: bf16[32,64], i: s32[], v: bf16[128,64]) -> bf16[32,64] {
  %w = bf16[4,64,128]{2,1,0} parameter(0)
  %x = bf16[32,64]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %v = bf16[128,64]{1,0} parameter(3)
  %alloc = bf16[4,32,128]{2,1,0} custom-call(), custom_call_target="AllocateBuffer"
  %dynamic_slice_fusion = (bf16[32,128]{1,0}, s8[1024]{0}) fusion(%w, %i, %x), kind=kCustom, calls=%dsf, backend_config={"fusion_backend_config":{"kind":"__custom_fusion","custom_fusion_config":{"name":"dynamic_slice_fusion","kernel_index":0}}}
  %y = bf16[32,128]{1,0} get-tuple-element(%dynamic_slice_fusion), index=0
  %gemm.2 = (bf16[32,64]{1,0}, s8[1024]{0}) custom-call(%y, %v), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/layers/mlp/wo/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %out = bf16[32,64]{1,0} get-tuple-element(%gemm.2), index=0
}
"""


def test_gemms_handed_to_cublas_and_an_uninitialised_buffer():
    costs = by_name(hlo_cost.kernel_costs(CUBLAS_MODULE))
    assert set(costs) == {"dynamic_slice_fusion", "gemm.2"}  # AllocateBuffer launches nothing
    fused, alone = costs["dynamic_slice_fusion"], costs["gemm.2"]
    assert fused.kind == alone.kind == "matmul"
    assert fused.flops == 2 * 32 * 128 * 64 and alone.flops == 2 * 32 * 64 * 128
    # the fusion reads one layer of the stacked weight, the index and its input, and writes its
    # result; neither counts cuBLAS's workspace as moved
    assert fused.bytes == 64 * 128 * 2 + 4 + 32 * 64 * 2 + 32 * 128 * 2
    assert alone.bytes == (32 * 128 + 128 * 64 + 32 * 64) * 2
    assert fused.op_name == "jit(step)/layers/mlp/wi_0/dot_general"  # its GEMM's: the fusion has none


def test_roofline_time_and_summary():
    machine = {"bandwidth": 1e9, "gemm_flops": 1e12, "launch_s": 1e-6}
    costs = hlo_cost.kernel_costs(MODULE, machine)
    gemm = by_name(costs)["gemm_fusion_dot.7"]
    assert gemm.seconds == pytest.approx(max(gemm.bytes / 1e9, gemm.flops / 1e12) + 1e-6)
    s = hlo_cost.summarize(costs)
    assert s["kernels"] == 4 * 6 + 5
    assert s["ms"] == pytest.approx(sum(c.seconds * c.runs for c in costs) * 1e3, abs=1e-3)  # rounded to us
    kinds = {r["name"]: r for r in s["kinds"]}
    assert kinds["matmul"]["kernels"] == 4
    assert "estimated" in hlo_cost.format_summary(s)


def test_changes_between_two_programs_by_work():
    """The same program run 8 times instead of 4: every kernel of the loop doubles its runs and
    time; a group only one side has counts from nothing; nothing moved, nothing listed."""
    base = hlo_cost.kernel_costs(MODULE)
    doubled = hlo_cost.kernel_costs(MODULE.replace('{"n":"4"}', '{"n":"8"}'))
    assert hlo_cost.changes(base, base) == []
    rows = {r["name"]: r for r in hlo_cost.changes(base, doubled, top=50)}
    gemm = rows["matmul: mlp/wi_0/dot_general"]
    assert gemm["kernels"] == 4 and gemm["ms"] == pytest.approx(gemm["base_ms"], abs=1e-3)
    assert all(r["kernels"] == 4 for r in rows.values()) and len(rows) == 7  # the loop's 7 kernels (its condition's too)
    gone = hlo_cost.changes(base, [c for c in base if c.kind != "matmul"])
    assert [(r["name"], r["kernels"], r["ms"]) for r in gone] == [("matmul: mlp/wi_0/dot_general", -4, -gemm["base_ms"])]
    assert [r["ms"] for r in hlo_cost.changes(base, doubled, top=2)] == sorted(
        (r["ms"] for r in rows.values()), key=abs, reverse=True)[:2]


def test_unknown_trip_count_counts_once_and_missing_entry_is_an_error():
    text = MODULE.replace('backend_config={"known_trip_count":{"n":"4"},"known_init_step":{"init":"0","step":"1"}}', "")
    assert by_name(hlo_cost.kernel_costs(text))["gemm_fusion_dot.7"].runs == 1
    # a decoding loop (XLA cannot know when every row stops) priced for the tokens asked for
    assert by_name(hlo_cost.kernel_costs(text, unknown_trips=7))["gemm_fusion_dot.7"].runs == 7
    with pytest.raises(ValueError, match="ENTRY"):
        hlo_cost.kernel_costs(MODULE.replace("ENTRY %main", "%main"))


def test_flops_of_a_compiled_program_match_the_dots():
    """On a real compiled module (this CPU's): the FLOPs of its dots, counted from the text, are
    those of the matmuls the function holds, inside a scanned loop too."""
    def f(x, ws):
        def layer(h, w):
            return jnp.tanh(h @ w), None
        h, _ = jax.lax.scan(layer, x, ws)
        return (h @ ws[0].T).sum()

    x = jnp.ones((16, 32), jnp.float32)
    ws = jnp.ones((3, 32, 32), jnp.float32)
    text = jax.jit(f).lower(x, ws).compile().as_text()
    flops = sum(c.flops * c.runs for c in hlo_cost.kernel_costs(text))
    assert flops == 4 * 2 * 16 * 32 * 32


def load_offline_gpu():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("offline_gpu", os.path.join(root, "bench", "offline_gpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_gpu_variants_split_config_from_xla_options():
    bench = load_offline_gpu()
    config, xla = bench.split_variant(["model.scan_unroll=16", "xla.xla_gpu_enable_dynamic_slice_fusion=true",
                                       "xla.--xla_gpu_autotune_level=1", "xla.xla_dump_to=/tmp/x"])
    assert config == ["model.scan_unroll=16"]
    assert xla == {"xla_gpu_enable_dynamic_slice_fusion": True, "xla_gpu_autotune_level": "1", "xla_dump_to": "/tmp/x"}


def test_offline_gpu_prices_a_saved_program(tmp_path, capsys):
    bench = load_offline_gpu()
    hlo = tmp_path / "step.hlo.txt"
    hlo.write_text(MODULE)
    out = tmp_path / "cost.json"
    assert bench.main(["--hlo", str(hlo), "--json", str(out), "--top", "3"]) == 0
    import json

    row = json.loads(out.read_text())["rows"][0]
    assert row["name"] == "saved" and row["kernels"] == 29 and len(row["top"]) == 3
    assert "estimated" in capsys.readouterr().out


def test_offline_gpu_sets_saved_programs_side_by_side(tmp_path, capsys):
    bench = load_offline_gpu()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "step.hlo.txt").write_text(MODULE)
    (tmp_path / "b" / "step.hlo.txt").write_text(MODULE.replace('{"n":"4"}', '{"n":"8"}'))
    out = tmp_path / "cost.json"
    assert bench.main(["--hlo", str(tmp_path / "a" / "step.hlo.txt"), "--hlo", str(tmp_path / "b" / "step.hlo.txt"),
                       "--json", str(out)]) == 0
    import json

    first, second = json.loads(out.read_text())["rows"]
    assert (first["name"], second["name"]) == ("a/step", "b/step") and "changes" not in first
    assert second["kernels"] - first["kernels"] == 28 and sum(r["kernels"] for r in second["changes"]) == 28
    assert "what changed from a/step to b/step" in capsys.readouterr().out


def test_offline_gpu_without_the_cuda_plugin_says_how_to_get_it():
    import importlib.util

    bench = load_offline_gpu()
    if importlib.util.find_spec("jax_plugins") is not None:
        pytest.skip("this environment has jax's CUDA plugin")  # CI's has CPU jax only
    with pytest.raises(SystemExit, match="offline_gpu_env.sh"):
        bench.h100_devices()


def test_collectives_are_priced_by_what_each_device_sends():
    """ZeRO-3 on 8 GPUs: an all-gather of a weight sends 7/8 of the gathered weight, a
    reduce-scatter 7/8 of the gradient it reduces, an all-reduce twice that; at the link rate."""
    text = """HloModule m, entry_computation_layout={()->()}

ENTRY %main (w: bf16[256,64], g: f32[2048,64], s: f32[64]) -> f32[64] {
  %w = bf16[256,64]{1,0} parameter(0)
  %g = f32[2048,64]{1,0} parameter(1)
  %s = f32[64]{0} parameter(2)
  %all-gather-start = ((bf16[256,64]{1,0}), bf16[2048,64]{1,0}) all-gather-start(%w), replica_groups=mesh['data'=1,'fsdp'=8,'tensor'=1] {'fsdp'}, dimensions={0}
  %all-gather-done = bf16[2048,64]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter = f32[256,64]{1,0} reduce-scatter(%g), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %all-reduce-start = f32[64]{0} all-reduce-start(%s), replica_groups=mesh['axis_0'=4] {'axis_0'}
  ROOT %all-reduce-done = f32[64]{0} all-reduce-done(%all-reduce-start)
}
"""
    costs = by_name(hlo_cost.kernel_costs(text, {"link_bandwidth": 1e9, "launch_s": 0.0}))
    assert set(costs) == {"all-gather-start", "reduce-scatter", "all-reduce-start"}
    assert costs["all-gather-start"].bytes == 2048 * 64 * 2 * 7 / 8
    assert costs["reduce-scatter"].bytes == 2048 * 64 * 4 * 7 / 8
    assert costs["all-reduce-start"].bytes == 2 * 64 * 4 * 3 / 4
    assert costs["all-gather-start"].seconds == pytest.approx(costs["all-gather-start"].bytes / 1e9)
    assert {c.kind for c in costs.values()} == {"collectives"}
