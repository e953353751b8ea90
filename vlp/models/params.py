"""Parameters with logical axis names: the one constructor every layer uses.

Variables carry their logical names as metadata; vlp.core.parallel maps them to
mesh axes. Flax's eager sharding would need a mesh at construction time.
"""
import flax
from flax import nnx

flax.config.update('flax_always_shard_variable', False)


def param(rngs, init, shape, names):
  return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape))
