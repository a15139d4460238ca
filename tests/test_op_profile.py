"""The per-op profiler of experiments/benchmarks/op_profile.py on a known program."""
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "experiments" / "benchmarks"))
# A repo module, imported, never skipped: its breakage must fail the tests.
import op_profile  # pylint: disable=g-import-not-at-top,wrong-import-position

HLO = """\
%fused_computation (param_0: f32[2,4]) -> f32[2,4] {
  %param_0 = f32[2,4]{1,0} parameter(0)
  ROOT %mul.1 = f32[2,4]{1,0} multiply(%param_0, %param_0), metadata={op_name="jit(f)/transpose(jvp(Net))/dense/mul"}
}

%fused_copy (param_0.1: f32[2,4]) -> f32[4,2] {
  %param_0.1 = f32[2,4]{1,0} parameter(0)
  ROOT %transpose.2 = f32[4,2]{1,0} transpose(%param_0.1), dimensions={1,0}
}

ENTRY %main (x: f32[2,4]) -> f32[4,2] {
  %x = f32[2,4]{1,0} parameter(0), metadata={op_name="x"}
  %dot.3 = f32[2,4]{1,0} dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={1}, metadata={op_name="jit(f)/jvp(Net)/conv_0/dot_general"}
  %multiply_fusion = f32[2,4]{1,0} fusion(%dot.3), kind=kLoop, calls=%fused_computation
  ROOT %copy_fusion = f32[4,2]{1,0} fusion(%multiply_fusion), kind=kLoop, calls=%fused_copy
}
"""


def test_instructions_are_grouped_by_pass_op_and_module():
  instructions = op_profile.hlo_instructions(HLO)
  assert instructions["dot.3"]["opcode"] == "dot"
  assert instructions["dot.3"]["shape"] == "f32[2,4]"
  assert op_profile.group_of("dot.3", instructions) == ("forward", "dot", "Net/conv_0")
  # A fusion takes its root's op_name: the transposed (backward) pass of Net/dense.
  assert op_profile.group_of("multiply_fusion", instructions) == (
      "backward", "fused elementwise", "Net/dense")
  assert op_profile.group_of("copy_fusion", instructions) == (
      "(no op_name)", "fused layout change", "")
  assert op_profile.layer_type("Net/backbone/stage1_conv1/Conv_3") == "Conv"


def test_a_traced_conv_gradient_is_matched_to_its_ops():
  """The ops of a conv's gradient are found in the trace, forward and backward, each timed."""
  x, kernel = jnp.ones((8, 16, 16, 4)), jnp.ones((3, 3, 4, 8))
  loss = lambda x, k: jnp.sum(jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile()
  jax.block_until_ready(compiled(x, kernel))

  def run():
    jax.block_until_ready(compiled(x, kernel))
    return 0.0

  ops = op_profile.profile_ops(compiled, run, num_steps=2)
  kinds = {(p, op) for p, op, _ in ops["groups"].values()}
  assert any(p == "forward" and "convolution" in op for p, op in kinds), kinds
  assert any(p == "backward" and "convolution" in op for p, op in kinds), kinds
  assert all(ms > 0 for ms in ops["op_ms"].values())
