"""Stage 2, build: execute a plan as a Ray Data job — decode, patchify, write verifiable Parquet shards.

Also streams the same rows unwritten (live mode). May import the packer root modules and the plan
stage (packer/plan/); never serve or analysis.
"""
