"""``shortquant prune``: choose the blocks to remove by measuring the model, then export it.

The torch model runs on calibration chunks through ``families.block_runner`` (shared with the
optimizer's probes), which keeps every block's input from one reference pass, so a candidate set
of removed blocks reruns only the blocks after the first one; ``criteria`` scores blocks (Block Influence, one-shot PPL, Taylor); ``search`` chooses a set
(one-shot per criterion, and the default greedy search checked on held-apart chunks);
``save_hf`` writes the pruned Hugging Face checkpoint; ``commands`` is the click command.
"""
