"""Pins and environments: the hashed Python locks and their offline check (locks), kernel git SHAs and their
build (kernels: stdlib only, it runs alone inside the serving image's build stage), the image pin policy (policy),
where a stage runs (runtime: venv or container), and the nox environments (envs: stdlib only, the noxfile imports
it before any environment exists).

Imports: the standard library (and packaging, lazily); no other mtpquant package.
"""
