"""The primitives every stage uses: one error type and exit codes (errors), atomic writes and temp dirs (atomic),
the one bounded safetensors reader (checkpoint), the run directory and its records (run: `Run` owns every path
under a run dir), rich progress (progress), the quiet terminal (quiet), peak memory (measure).

Imports: the standard library and third-party packages; no other mtpquant package.
"""
