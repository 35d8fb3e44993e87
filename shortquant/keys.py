"""Our own GGUF metadata keys (pruning provenance), spelled once.

Standard keys come from ``gguf.Keys``; only what the GGUF spec does not cover lives here.
"""

SOURCE_BLOCKS = "shortquant.source_blocks"              # int32[]: original block index of blk.N
SOURCE_BLOCK_COUNT = "shortquant.source_block_count"    # uint32: blocks in the unpruned model
PRUNING_METHOD = "shortquant.pruning.method"            # string, e.g. "Shortened LLaMA (Taylor+)"
RECIPE = "shortquant.recipe"                            # string: recipe name used, if any
VERSION = "shortquant.version"                          # string: the shortquant that wrote the file
