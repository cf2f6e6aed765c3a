"""Agglomeration: affinities -> fragments -> region graph -> one segmentation, exactly.

rag.py: the region graph's pure kernel (a block's partial sums and their exact merge);
graphdb.py: those partials stored block by block and reduced into funlib's graph schema.
"""
