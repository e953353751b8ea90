"""Zero-shot classification: class names x prompt templates -> one text embedding per class.

The CLIP recipe: every class name is put into every template, the template
embeddings (L2-normalised by the encoder) are averaged and the mean is
normalised again; an image's predicted class is the most similar class
embedding. Metrics in percent: top-1, top-5 and the mean over classes of the
per-class recall (balanced accuracy), as clip_benchmark reports them.
"""
import numpy as np

from vlp.eval import embed

# CLIP's seven best ImageNet templates (the CLIP repository's prompt-engineering notebook).
CLIP_TEMPLATES = ('itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
                  'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.')


def class_embeddings(text_emb_per_prompt: np.ndarray, num_classes: int) -> np.ndarray:
  """[C*T, D] embeddings, class-major (class c's templates are rows c*T..c*T+T-1)
  -> [C, D]: the mean over templates, re-normalised."""
  emb = np.asarray(text_emb_per_prompt, np.float32).reshape(num_classes, -1, text_emb_per_prompt.shape[-1])
  mean = emb.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> dict:
  """top-K accuracy and mean per-class recall, in percent. A class that scores
  the same as the true one is ranked before it (ties count against)."""
  logits, labels = np.asarray(logits, np.float32), np.asarray(labels)
  true = np.take_along_axis(logits, labels[:, None], axis=1)
  others = np.ones_like(logits, bool)
  np.put_along_axis(others, labels[:, None], False, axis=1)
  rank = np.sum(others & (logits >= true), axis=1)
  out = {f'acc{k}': 100.0 * float(np.mean(rank < k)) for k in ks}  # top-min(k, C), as clip_benchmark
  present = np.unique(labels)  # classes without a test image have no recall
  out['mean_per_class_recall'] = 100.0 * float(np.mean([np.mean(rank[labels == c] == 0) for c in present]))
  return out


class Evaluator:
  """Zero-shot classification; `run(params)` yields (name, value) pairs.

  predict_fns as for retrieval. data: `image` uint8 [N, H, W, 3], `label` [N] and
  `class_names`; `tokenize(list of str) -> int32 [n, L]`.
  """

  def __init__(self, predict_fns, data, tokenize, templates, batch_size=256):
    self.encode_image, self.encode_text = embed.Encoder(predict_fns['image']), embed.Encoder(predict_fns['text'])
    self.data, self.batch_size, self.templates = data, batch_size, tuple(templates)
    prompts = [t.format(name) for name in data['class_names'] for t in self.templates]
    self.prompts = tokenize(prompts)

  def classifier(self, params) -> np.ndarray:
    per_prompt = self.encode_text(params, self.prompts, self.batch_size)
    return class_embeddings(per_prompt, len(self.data['class_names']))

  def run(self, params):
    classes = self.classifier(params)
    image_emb = self.encode_image(params, self.data['image'], self.batch_size, self.data.get('image_rows'))
    metrics = classification_metrics(image_emb @ classes.T, self.data["label"])
    yield from metrics.items()
