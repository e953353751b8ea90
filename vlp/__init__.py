"""vlp: pre-training vision-language models in JAX. `vlp.load_pretrained(PATH)` loads an export."""


def load_pretrained(path: str):
  """Image and text encoders of a `vlp export` directory (see vlp.pretrained.Encoders).

  Imported on call, so `import vlp` stays light."""
  from vlp import pretrained
  return pretrained.load(path)
