"""One process of a multi-process eval (tests/test_evals.py): the tiny model's params, sharded
over a data x fsdp x tensor mesh, embedded and evaluated by the trainer's evaluators; process 0
writes the embeddings and metrics to an .npz.

  python tests/eval_worker.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(out, coordinator=None, num_processes=None, process_id=None):
  from vlp.core import distributed
  if coordinator:
    distributed.initialize(coordinator, int(num_processes), int(process_id))
  import jax
  import numpy as np
  from tiny import get_config
  from vlp import eval as eval_lib, plan as plan_lib
  from vlp.core import parallel
  from vlp.data import tokenizer as tokenizer_lib
  from vlp.train import loop, state as state_lib
  config = get_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.data.eval_images = 30  # 30 images, 120 captions: batches of 12 leave padding on every host
  config.evals.retrieval.batch_size = 12
  plan = plan_lib.make(config, jax.device_count(), jax.process_count())
  setup = state_lib.make_setup(plan, parallel.make_mesh(plan.sizes))
  params = loop.fresh_state(plan, setup)['params']
  [(_, _, evaluator)] = eval_lib.make(config, plan.recipe.predict_fns(setup.graphdef), tokenizer_lib.for_config(config))
  image_emb, text_emb = evaluator.embed(params)
  metrics = dict(evaluator.run(params))
  if jax.process_index() == 0:
    np.savez(out, image=image_emb, text=text_emb, **{f'metric/{k}': v for k, v in metrics.items()})


if __name__ == '__main__':
  main(*sys.argv[1:])
