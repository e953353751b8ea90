"""ALBEF retrieval: rank by ITC similarity, then re-rank the top k by the ITM head.

As ALBEF's Retrieval.py: for every image the k captions of highest ITC
similarity go through the fusion encoder with it, and for every caption the
k images likewise; a candidate's new score is its ITM match logit, every
other candidate scores -inf (so recall@K is meaningful for K <= k). A second
re-ranking keeps the ITC evidence, as BLIP's evaluation adds the similarity
to the ITM score: the ITC logit (similarity / temperature) plus the ITM
log-probability of a match, i.e. the log of the product of both models'
probabilities (up to a per-query constant). All three rankings are reported
with the keys of `recall_at_k`: `i2t@1`... (ITC, with RSUM and per language as
every retrieval evaluator), `itm/i2t@1`... (ALBEF's) and `itm_itc/i2t@1`...,
under the evaluator's name in config.evals.
"""
import numpy as np

from vlp.eval import embed, retrieval
from vlp.models.text import PAD_ID

NEEDS = ('image_tokens', 'text_hidden', 'itm_logits', 'itc_temperature')  # of the recipe's predict_fns


class Evaluator(retrieval.Evaluator):
  """predict_fns: the retrieval ones, plus `image_tokens(params, images)`,
  `text_hidden(params, tokens)`, `itm_logits(params, text_hidden, mask, image_tokens)`
  ([N, 2], 1 = match) and `itc_temperature(params)` (a float)."""
  RERANKINGS = (('itm', 'ITM'), ('itm_itc', 'ITM + ITC'))

  def __init__(self, predict_fns, data, rerank_k, batch_size=256, ks=(1, 5, 10), by_language=True):
    super().__init__(predict_fns, data, batch_size, ks, by_language)
    self.rerank_k = rerank_k
    self.image_tokens = embed.Encoder(predict_fns['image_tokens'])
    self.text_hidden = embed.Encoder(predict_fns['text_hidden'])
    self.itm_logits = embed.Replicated(predict_fns['itm_logits'])
    self.temperature = predict_fns['itc_temperature']

  def run(self, params):
    image_emb, text_emb = self.embed(params)
    text_to_image = self.data['text_to_image']
    yield from self.itc_metrics(image_emb, text_emb)
    sims = image_emb @ text_emb.T
    itm = self.rerank(params, sims)
    temp = self.temperature(params)
    with np.errstate(invalid='ignore'):  # -inf + finite stays -inf
      both = {'itm': itm['match_logit'], 'itm_itc': tuple(
          s + x / temp for s, x in zip(itm['match_logprob'], (sims, sims.T)))}
    for name, (i2t, t2i) in both.items():
      reranked = retrieval.recall_at_k_from_scores(i2t, t2i, text_to_image, self.ks)
      reranked['rsum'] = retrieval.rsum(reranked, self.ks)
      for key, value in reranked.items():
        yield f'{name}/{key}', value

  def rerank(self, params, sims) -> dict:
    """ITC similarities [images, captions] -> the top k's ITM scores, -inf elsewhere:
    {'match_logit' (ALBEF's score), 'match_logprob'}: (i2t [images, captions], t2i [captions, images])."""
    n_img, n_txt = sims.shape
    tokens = self.data['text']
    image_tokens = self.image_tokens(params, self.data['image'], self.batch_size, self.data.get('image_rows'))
    text_hidden = self.text_hidden(params, tokens, self.batch_size)
    k_i2t, k_t2i = min(self.rerank_k, n_txt), min(self.rerank_k, n_img)
    top_i2t = np.argsort(-sims, axis=1, kind='stable')[:, :k_i2t]  # captions of each image
    top_t2i = np.argsort(-sims.T, axis=1, kind='stable')[:, :k_t2i]  # images of each caption
    text_ids = np.concatenate([top_i2t.ravel(), np.repeat(np.arange(n_txt), k_t2i)])
    image_ids = np.concatenate([np.repeat(np.arange(n_img), k_i2t), top_t2i.ravel()])
    logits = np.concatenate([
        np.asarray(self.itm_logits(params, *self._pairs(text_hidden, tokens, image_tokens, t, i)))[:len(t)]
        for t, i in self._chunks(text_ids, image_ids)])
    n = n_img * k_i2t
    out = {}
    for name, scores in (('match_logit', logits[:, 1]),
                         ('match_logprob', logits[:, 1] - np.logaddexp(logits[:, 0], logits[:, 1]))):
      i2t = np.full((n_img, n_txt), -np.inf, np.float32)
      t2i = np.full((n_txt, n_img), -np.inf, np.float32)
      i2t[image_ids[:n], text_ids[:n]] = scores[:n]
      t2i[text_ids[n:], image_ids[n:]] = scores[n:]
      out[name] = (i2t, t2i)
    return out

  def _chunks(self, text_ids, image_ids):
    for a in range(0, len(text_ids), self.batch_size):
      yield text_ids[a:a + self.batch_size], image_ids[a:a + self.batch_size]

  def _pairs(self, text_hidden, tokens, image_tokens, t, i):
    """Host-gathered inputs of pairs (t[j], i[j]), padded to the batch size (one compilation)."""
    pad = lambda x: np.pad(x, [(0, self.batch_size - len(x))] + [(0, 0)] * (x.ndim - 1))
    return pad(text_hidden[t]), pad(tokens[t] != PAD_ID), pad(image_tokens[i])
