"""Stage 4, analysis: check a written pack and describe it (`navit stats`, plan report, plots, row views).

Reads packs through the shard contract (packer.schema). May import the packer root modules and
the plan stage; never build or serve.
"""
