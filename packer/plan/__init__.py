"""Stage 1, plan: list the source, read image headers, draw sizes/crops/drops, bin-pack into sequences.

Decodes no pixel; the output is a :class:`packer.plan.types.Plan`. May import the packer root modules
(config, errors, schema, storage, localfile, imagefile, ray_runtime) only — never build, serve or analysis.
"""
