"""Graph-level passes: canonicalize a Dynamo graph, find its regions, build the dense ops' operands.

They know nothing of methods: sparsify/plan.py decides what each region becomes, sparsify/methods/ rewrites it,
sparsify/pipeline.py runs the whole chain on each graph.
"""
from .regions import Region

__all__ = ["Region"]
