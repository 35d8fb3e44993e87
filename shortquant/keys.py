"""Our own GGUF metadata keys (pruning provenance), spelled once.

Standard keys come from ``gguf.Keys``; only what the GGUF spec does not cover lives here.
"""

SOURCE_BLOCKS = "shortquant.source_blocks"              # int32[]: original block index of blk.N
SOURCE_BLOCK_COUNT = "shortquant.source_block_count"    # uint32: blocks in the unpruned model
PRUNING_METHOD = "shortquant.pruning.method"            # string, e.g. "Shortened LLaMA (Taylor+)"
RECIPE = "shortquant.recipe"                            # string: recipe name used, if any
VERSION = "shortquant.version"                          # string: the shortquant that wrote the file
REMOVED_ATTENTION = "shortquant.removed_attention"      # int32[]: blk.N whose attention the source removed
REMOVED_MLP = "shortquant.removed_mlp"                  # int32[]: blk.N whose MLP the source removed
REMOVED_EXPERTS = "shortquant.removed_experts"          # string[]: per blk.N, the source experts removed ("3,7")
SOURCE_EXPERT_COUNT = "shortquant.source_expert_count"  # uint32: experts per block in the unpruned model

# A measured, optimized type mix (shortquant export --optimize / --target-bpw / --target-size)
OPTIMIZE_BASE_MIX = "shortquant.optimize.base_mix"          # string: standard mix it was compared with
OPTIMIZE_BUDGET = "shortquant.optimize.budget_bytes"        # uint64: whole-file byte budget
OPTIMIZE_CALIBRATION = "shortquant.optimize.calibration"    # string: calibration text name and sha256
OPTIMIZE_KLD = "shortquant.optimize.kld_calibration"        # float32: measured KLD vs the source model
OPTIMIZE_KLD_BASE = "shortquant.optimize.kld_calibration_base_mix"  # float32: the same for the base mix
OPTIMIZE_CHANGES = "shortquant.optimize.changes"            # string[]: "tensor=TYPE" where it differs
# The type name of a file that records OPTIMIZE_BUDGET: its mix's name and this ("Q4_K_M_OPT")
OPT_SUFFIX = "_OPT"
