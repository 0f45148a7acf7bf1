"""The kernel every layer shares: the job contract, settings, Redis connections and key names.

It imports nothing of the project above it (see "Layers" in the README), so a
helper author's module, a channel and the operator tools all start here.
"""
