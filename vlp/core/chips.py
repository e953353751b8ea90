"""TPU chips and how Cloud TPU names their slices: the one table `vlp compile` reads.

Per chip, from the Google Cloud TPU documentation pages (key specifications
tables), by page title:
  "TPU v4"   peak compute per chip 275 TFLOPs (bf16); HBM2 32 GiB, 1200 GBps
  "TPU v5e"  peak compute per chip (bf16) 197 TFLOPs; HBM2 16 GB, 819 GBps
  "TPU v5p"  peak compute per chip (bf16) 459 TFLOPs; HBM2e 95 GB, 2765 GBps
  "TPU v6e"  peak compute per chip (bf16) 918 TFLOPs; HBM 32 GB, 1638 GBps
Capacities are taken as printed there: 'GiB' as 2^30 bytes, 'GB' as 10^9
(so the v5e/v5p/v6e limits are on the safe side); bandwidths in 10^9 bytes/s.

Accelerator-type names (`v5p-256`) follow Cloud TPU's convention, which
differs by generation ("TPU v4" / "TPU v5p" pages, "Configurations"):
  v4, v5p    the number counts TensorCores, 2 per chip: v4-256 and v5p-256
             are 128 chips (topologies 4x4x8). JAX sees one device per chip
             (megacore: the chip's two TensorCores act as one device).
  v5e, v6e   the number counts chips (one TensorCore each): v5e-256 is 256
             chips (16x16).
The topology form `v5e:16x16` / `v4:4x4x8` names the chip grid directly.
"""
import dataclasses
import math
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # generation as in accelerator types: 'v4', 'v5e', 'v5p', 'v6e'
  hbm_bytes: int
  peak_flops: float  # bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip
  cores_per_chip: int  # TensorCores; what the v4/v5p accelerator-type number counts
  dims: int  # 3: 3D torus (v4, v5p), 2: 2D torus (v5e, v6e)
  libtpu: str  # the generation's name in libtpu topology strings
  source: str  # the documentation page the numbers are from


GiB, GB = 2 ** 30, 10 ** 9
CHIPS = {
    'v4': Chip('v4', 32 * GiB, 275e12, 1200 * GB, 2, 3, 'v4', 'Google Cloud TPU docs, "TPU v4"'),
    'v5e': Chip('v5e', 16 * GB, 197e12, 819 * GB, 1, 2, 'v5e', 'Google Cloud TPU docs, "TPU v5e"'),
    'v5p': Chip('v5p', 95 * GB, 459e12, 2765 * GB, 2, 3, 'v5p', 'Google Cloud TPU docs, "TPU v5p"'),
    'v6e': Chip('v6e', 32 * GB, 918e12, 1638 * GB, 1, 2, 'v6e', 'Google Cloud TPU docs, "TPU v6e"'),
}
ALIASES = {'v5litepod': 'v5e', 'v5lite': 'v5e', 'v5': 'v5p', 'v6': 'v6e'}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  shape: tuple  # chips along each torus dimension
  name: str  # as given

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def libtpu_name(self) -> str:
    """What jax.experimental.topologies.get_topology_desc takes, e.g. 'v4:4x4x8'."""
    return f'{self.chip.libtpu}:' + 'x'.join(map(str, self.shape))

  @property
  def accelerator_type(self) -> str:
    return f'{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}'

  @property
  def chip_config(self) -> str:
    """libtpu's chip configuration: 'megacore' (one device per chip) where a chip has 2 cores."""
    return 'megacore' if self.chip.cores_per_chip == 2 else 'default'


def _generation(name: str) -> Chip:
  gen = ALIASES.get(name.lower(), name.lower())
  if gen not in CHIPS:
    raise ValueError(f'unknown TPU generation {name!r}; known: {", ".join(CHIPS)}')
  return CHIPS[gen]


def default_shape(chips: int, dims: int) -> tuple:
  """The usual slice shape for a power-of-two chip count: v5e 4 -> 2x2, 256 -> 16x16;
  v4/v5p 4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, 128 -> 4x4x8."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f'{chips} chips: give the shape as GEN:AxB(xC) (only power-of-two sizes are derived)')
  if dims == 3 and chips < 4:
    return {1: (1, 1, 1), 2: (1, 2, 1)}[chips]
  shape = [1] * dims if dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    i = max(j for j, s in enumerate(shape) if s == smallest)  # the last of the smallest
    shape[i] *= 2
  return tuple(shape)


def parse(name: str) -> Topology:
  """'v5p-256' (accelerator type) or 'v5e:16x16' / 'v4:4x4x8' (topology) -> Topology."""
  m = re.fullmatch(r'(v\w+?)[-:](.+)', name.strip())
  if not m:
    raise ValueError(f'topology {name!r}: expected an accelerator type like v5p-256 or a topology like v5e:16x16')
  chip = _generation(m.group(1))
  rest = m.group(2)
  if ':' in name:
    if not re.fullmatch(r'\d+(x\d+)*', rest):
      raise ValueError(f'topology {name!r}: the shape must be like 4x4 or 4x4x8')
    shape = tuple(int(s) for s in rest.split('x'))
    if len(shape) != chip.dims:
      raise ValueError(f'topology {name!r}: {chip.name} slices are {chip.dims}-D ({"AxBxC" if chip.dims == 3 else "AxB"})')
  else:
    if not rest.isdigit():
      raise ValueError(f'accelerator type {name!r}: expected GEN-N, e.g. v5p-256')
    count = int(rest)
    if count % chip.cores_per_chip:
      raise ValueError(f'{name}: {chip.name} names count TensorCores ({chip.cores_per_chip} per chip); '
                       f'{count} is not a whole number of chips')
    shape = default_shape(count // chip.cores_per_chip, chip.dims)
  return Topology(chip, shape, name)
