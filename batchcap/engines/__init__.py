"""Engines drive the stages of :mod:`batchcap.stages`: ``local`` (threads + the model in this
process) and ``ray`` (Ray CPU tasks + model replicas). They are peers: neither imports the other."""
