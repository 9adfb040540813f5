"""A tiny harvest for the store tests: the random tiny-llama preset over a small local text file.

The tests override ``data.corpus`` (a file they write) and ``workdir`` (a temporary directory).
"""
from saejax import config as cfg


def get_config(arg=""):
    c = cfg.defaults()
    c.workdir = "/tmp/saejax-tiny"
    c.model.source = "random:tiny-llama"
    c.data.corpus = "corpus.txt"
    c.data.context_len = 16
    c.data.heldout_contexts = 3
    c.harvest.layers = (0, 3)
    c.harvest.kinds = ("res", "att", "mlp")
    c.harvest.batch_contexts = 8  # one context per device of the tests' 8 virtual devices
    c.harvest.shuffle_bytes = 2 ** 15  # one commit per batch on one process, per 2 batches on two
    c.harvest.shard_bytes = 2 ** 12
    c.harvest.skip_first = 0
    c.harvest.max_norm_ratio = 0.0
    c.mesh.data = -1
    return c
