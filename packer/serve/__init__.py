"""Stage 3, serve: hand packed rows to trainers over Arrow Flight, from a pack on disk or built live.

May import the packer root modules, the plan and build stages (live mode, imported lazily); never analysis.
"""
