"""Pure Flax NNX modules: layers, Mixture-of-Experts, towers and the models built from them.

Nothing here knows about training, data or configs beyond the model's own
section (`config.model`): a recipe (vlp.recipes) builds a model and says how
it is trained.
"""
