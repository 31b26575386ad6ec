"""Serving and measuring an artifact: vLLM serving (serve, serve_cli), lm-eval (evaluate), `vllm bench serve`
(bench), the report and the terminal summary (report, summary).

Imports: mtpquant.core, mtpquant.pins, mtpquant.model, mtpquant.chain.
"""
