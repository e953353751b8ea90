"""The devices of a TPU topology that is not attached, and the mesh over them.

Names: `v5p-256` is an accelerator type (v4/v5p count TensorCores, 2 per
chip; v5e/v6e count chips), `v5e:16x16` a chip grid; see vlp.core.chips. With
num_slices=N the data axis spans N slices over DCN (MaxText's
dcn_data_parallelism): mesh_utils.create_hybrid_device_mesh puts data/N of
it inside each slice and N across.
"""
import importlib.util
import os
import shutil
import tempfile

from vlp.core import chips, parallel
from vlp.core.config import ConfigError, MESH_AXES

DUMP_ENV = 'VLP_COMPILE_DUMP'  # set by prepare_env: where XLA writes buffer assignments


def have_libtpu() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def tpu_env():
  """libtpu on a machine without TPUs: no metadata server to ask, and no lock on libtpu (several
  processes, e.g. test workers, may load it at once)."""
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


def prepare_env():
  """Before any JAX backend starts (the CLI): CPU as the host platform, and an XLA dump folder
  for the buffer assignments that name the largest buffers of a program that does not fit.
  XLA reads its flags once per process, so a process that has compiled before (a test run)
  gets no dump, and the line names the largest state leaves instead."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  tpu_env()
  if DUMP_ENV not in os.environ:
    d = tempfile.mkdtemp(prefix='vlp_compile_')
    os.environ[DUMP_ENV] = d
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_dump_to={d} --xla_dump_hlo_pass_re=^$').strip()


def cleanup_dump():
  d = os.environ.get(DUMP_ENV)
  if d and os.path.basename(d).startswith('vlp_compile_'):
    shutil.rmtree(d, ignore_errors=True)


def topology_devices(topo: chips.Topology, num_slices: int = 1) -> list:
  tpu_env()
  from jax.experimental import topologies
  kw = dict(platform='tpu', topology_name=topo.libtpu_name, chip_config_name=topo.chip_config,
            num_slices=num_slices)
  if topo.num_chips >= 4:  # hosts of 4 chips (2x2), as TPU VMs
    kw['chips_per_host_bounds'] = (2, 2, 1)
  return list(topologies.get_topology_desc(**kw).devices)


def make_mesh(sizes: dict, devices, num_slices: int):
  """The config's mesh over the topology's devices; across slices, the data axis over DCN."""
  import jax
  from jax.experimental import mesh_utils
  if num_slices == 1:
    return parallel.make_mesh(sizes, devices=devices)
  if sizes['data'] % num_slices:
    raise ConfigError(f"config key 'mesh.data': {sizes['data']} is not divisible by {num_slices} slices "
                      '(the data axis spans the slices over DCN)')
  ici = [sizes[a] for a in MESH_AXES]
  ici[0] //= num_slices
  dcn = [num_slices] + [1] * (len(MESH_AXES) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
