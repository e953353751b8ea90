"""BERT: a text encoder imported to start from, not trained alone.

`vlp import` of a transformers BertModel or BertForMaskedLM directory writes a vlp export of
this model (vlp.models.bert); `vlp.load_pretrained(DIR).encode_text` gives BertModel's last
hidden states, `vlp export --format=hf` gives the transformers directory back, and ALBEF's
text stack starts from it with `--config.init.text_from=DIR` (vlp.recipes.albef), as ALBEF
starts from bert-base-uncased. vlp has no BERT pretraining task (MLM on text alone): a run
of this model is refused before anything is built.
"""
import jax.numpy as jnp
from flax import nnx

from vlp.core import config as config_lib
from vlp.core.config import ConfigError
from vlp.models import bert as model_lib
from vlp.recipes import base


class Bert(base.Recipe):
  name = 'bert'
  modalities = ('text',)
  eval_kinds = ()

  def config_sections(self):
    return {
        # bert-base-uncased's layout: post-LN blocks, exact GELU, LayerNorm eps 1e-12
        'model': dict(text=dict(vocab_size=30522, context_length=512, width=768, depth=12, num_heads=12,
                                mlp_dim=3072, post_ln=True, moe=config_lib.moe_config()),
                      pooler=True,  # BertModel's pooler (tanh of a dense layer on [CLS])
                      mlm_head=False,  # BertForMaskedLM's prediction head
                      arch=dict(init='xavier', gelu='erf', ln_eps=1e-12)),
    }

  def validate(self, config, tasks=()):
    raise ConfigError("config key 'model.name': 'bert' is a text encoder imported to start from (vlp import of "
                      'a transformers BertModel); vlp does not train it alone: train ALBEF from it with '
                      '--config.init.text_from=DIR')

  def build(self, model_cfg, seed=0):
    return model_lib.Model(model_cfg, rngs=nnx.Rngs(seed))

  def predict_fns(self, graphdef):
    return {'text': lambda p, t: nnx.merge(graphdef, p).encode_text(t)}

  def export_encoders(self, model_cfg):
    return {'text': ('encode_text', (model_cfg.text.context_length,), jnp.int32)}


RECIPE = Bert()
