"""`vlp compile`: compile a config's training step ahead of time for a TPU slice, on a CPU.

  vlp compile --config=configs/align_l16.py --topology=v5p-256 [--num_slices=2] [--json=PATH]

libtpu (the `jax[tpu]` extra, in the `test` and `tpu` extras) builds the
devices of a TPU topology that is not attached (jax.experimental.topologies,
as MaxText's train_compile.py); every variant of the plan is lowered and
compiled for them by training's own `compile_train_step` (the config's mesh,
shardings and donation, abstract state only: nothing is allocated), and so
are the recipe's eval encoders. What comes out is the TPU compiler's own
account: per-device argument, output, temp bytes against the chip's HBM,
FLOPs and bytes accessed, the collectives in the optimized HLO, and the
step-time lower bounds they imply. The command exits 1 when a program does
not fit, with one line naming its largest buffers.

  target    the topology's devices, the (multi-slice) mesh, the environment libtpu needs
  programs  compiling the train steps and eval encoders; reading memory and cost
  hlo       collectives of the optimized HLO; the largest buffers of XLA's buffer assignment
  report    the printed report, the JSON record, the line of a config that does not fit
  command   `run` (everything, returns the record) and `main` (the CLI's body)
"""
