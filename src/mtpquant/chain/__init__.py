"""The artifact chain around quantize: prepare (local, tiny or a hub snapshot checked against its source lock:
hub), preflight, inject-mtp, verify, manifest, and publish to the hub.

Imports: mtpquant.core, mtpquant.pins, mtpquant.model, mtpquant.tiny.
"""
