"""The tiny trained model end to end through real tools: llm-compressor GPTQ -> inject-mtp -> vLLM (CPU) ->
lm-eval and `vllm bench serve`. vLLM and lm-eval live in their own environment (pinned/serve-cpu.txt; it cannot
share one with llm-compressor), found through $MTPQUANT_SERVE_PYTHON (`nox -s tests` sets it up).

One server per configuration, shared through session fixtures: BF16 with and without MTP, the W4A16 artifact
with its injected MTP (served as its dequantized BF16 copy: no INT4 MoE kernel on this CPU), the RTN INT4
baseline, and an artifact whose MTP layer came from a different model.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mtpquant.calib.quantize import quantize
from mtpquant.chain.inject_mtp import inject_mtp
from mtpquant.chain.verify import verify, verify_record
from mtpquant.core.run import Run
from mtpquant.tiny.fixture import write_fixture
from mtpquant.tiny.train_tiny import TrainConfig, spec_for

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(os.environ.get("MTPQUANT_TINY_MODEL", ROOT / "data" / "models" / "tiny-arith"))


@pytest.fixture(scope="session")
def serve_python() -> str:
    py = os.environ.get("MTPQUANT_SERVE_PYTHON")
    if not py or not Path(py).exists():
        pytest.fail("MTPQUANT_SERVE_PYTHON must name the python of the serving venv (pinned/serve-cpu.txt); "
                    "`nox -s tests` creates it")
    return py


def mtpquant(python: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([python, "-m", "mtpquant", *args], capture_output=True, text=True, cwd=ROOT,
                       env=os.environ | {"PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"})
    if check and r.returncode != 0:
        raise AssertionError(f"mtpquant {' '.join(args)} exited {r.returncode}:\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="session")
def chain(tmp_path_factory, serve_python) -> dict[str, Path]:
    """base (the committed BF16 model), quantized (no MTP), artifact (+ injected MTP), rtn, foreign-MTP artifact."""
    root = tmp_path_factory.mktemp("arith")
    run = Run(root)
    run.record("quantize", quantize(MODEL, "w4a16-asym-g128", "tiny-arith", run.quantized))
    run.record("inject-mtp", inject_mtp(MODEL, run.quantized, run.artifact))
    checks = verify(run.artifact, MODEL)
    run.record("verify", verify_record(run.artifact, MODEL, checks))
    assert all(c.ok for c in checks), [c.failures for c in checks if not c.ok]
    mtpquant(serve_python, "rtn", "--base", str(MODEL), "--out", str(root / "rtn"))
    # A model of the same shape but other weights: its MTP layer is "foreign" to the artifact.
    other = write_fixture("glm4_moe", spec_for(TrainConfig()), root / "other")
    inject_mtp(other, run.quantized, root / "foreign")
    return {"root": root, "base": MODEL, "quantized": root / "quantized", "artifact": root / "artifact",
            "rtn": root / "rtn", "foreign": root / "foreign"}


@pytest.fixture(scope="session")
def evals(chain, serve_python):
    """label -> eval result (lm-eval through a vLLM server started for it), each computed once."""
    configs = {"bf16": ("base", True), "bf16-nomtp": ("base", False), "w4a16": ("artifact", True),
               "rtn": ("rtn", False), "foreign": ("foreign", True)}
    cache: dict[str, Any] = {}

    def get(label: str) -> dict[str, Any]:
        if label not in cache:
            key, mtp = configs[label]
            args = ["eval", "--run", str(chain["root"]), "--artifact", str(chain[key]), "--suite", "tiny",
                    "--label", label, "--name", label]
            mtpquant(serve_python, *args, *([] if mtp else ["--no-mtp"]))
            cache[label] = json.loads((chain["root"] / "eval" / f"{label}.json").read_text())
        return cache[label]

    return get


def score(res: dict[str, Any]) -> float:
    (task,) = res["tasks"]
    return task["value"]


def outputs(res: dict[str, Any]) -> list[str]:
    return [s["output"] for s in res["samples"]["tiny_arith"]]


def test_bf16_model_has_real_skill(evals):
    res = evals("bf16")
    assert res["tasks"][0]["n"] == 200
    assert score(res) >= 0.8


def test_mtp_is_lossless_greedy_outputs_identical(evals):
    with_mtp, without = outputs(evals("bf16")), outputs(evals("bf16-nomtp"))
    assert len(with_mtp) == 200
    assert with_mtp == without
    assert evals("bf16-nomtp")["mtp_acceptance"] is None  # no speculative decoding on that server


def test_w4a16_within_005_of_bf16_and_no_worse_than_rtn(evals):
    bf16, w4, rtn = score(evals("bf16")), score(evals("w4a16")), score(evals("rtn"))
    assert abs(w4 - bf16) <= 0.05, (w4, bf16)
    assert w4 >= rtn, (w4, rtn)


def test_w4a16_next_token_distributions_closer_to_bf16_than_rtn(evals):
    from mtpquant.serving.evaluate import compare_logprobs

    ref = evals("bf16")["answer_logprobs"]
    w4 = compare_logprobs(ref, evals("w4a16")["answer_logprobs"])
    rtn = compare_logprobs(ref, evals("rtn")["answer_logprobs"])
    same = compare_logprobs(ref, evals("bf16-nomtp")["answer_logprobs"])
    assert w4["positions"] > 2000 and same["kl_mean"] < 1e-3 and same["top1_flip_rate"] < 0.005
    assert 0 < w4["kl_mean"] < rtn["kl_mean"], (w4, rtn)
    assert w4["top1_flip_rate"] <= rtn["top1_flip_rate"], (w4, rtn)


def test_mtp_acceptance_with_quantized_target_and_injected_mtp(evals):
    w4 = evals("w4a16")["mtp_acceptance"]
    bf16 = evals("bf16")["mtp_acceptance"]
    assert w4["draft_tokens"] > 1000
    assert w4["rate"] >= 0.5
    assert abs(w4["rate"] - bf16["rate"]) <= 0.05, (w4["rate"], bf16["rate"])
    assert evals("w4a16")["server"]["notes"] and "DEQUANTIZED" in evals("w4a16")["server"]["notes"][0]


def test_dequantized_copy_has_int4_values_and_the_injected_mtp(chain, evals):
    from safetensors import safe_open

    from mtpquant.core.checkpoint import Checkpoint, tensor_sha256
    from mtpquant.model.families import family_for

    evals("w4a16")
    deq = Checkpoint(chain["root"] / "serve-bf16-artifact")
    base = Checkpoint(MODEL)
    fam = family_for(base.config)
    assert "quantization_config" not in deq.config
    name = next(n for n in fam.routed_expert_linears(base.config) if n.endswith("down_proj")) + ".weight"
    with safe_open(str(deq.tensors[name].shard), "pt") as fh:
        w = fh.get_tensor(name)
    assert w.shape[1] == 128 and all(row.unique().numel() <= 16 for row in w)  # one group of 128: 4 bits
    mtp = [n for n in base.tensors if n.startswith(tuple(fam.mtp_prefixes(base.config)))]
    assert mtp and all(tensor_sha256(deq.tensors[n]) == tensor_sha256(base.tensors[n]) for n in mtp)


def test_foreign_mtp_is_caught_by_verify_and_collapses_acceptance(chain, evals):
    checks = verify(chain["foreign"], MODEL)
    mtp_check = next(c for c in checks if c.name.startswith("MTP tensors"))
    assert not mtp_check.ok and "differs from the base" in mtp_check.failures[0]
    foreign, ours = evals("foreign"), evals("w4a16")
    # the draft is next to useless (a random MTP layer still hits some frequent tokens through the shared head)
    assert foreign["mtp_acceptance"]["rate"] < 0.5 * ours["mtp_acceptance"]["rate"]
    assert outputs(foreign) == outputs(ours)  # ... and still lossless: the same greedy outputs


def test_artifact_without_injected_mtp_is_refused_before_vllm_starts(chain, serve_python):
    r = mtpquant(serve_python, "serve", "--run", str(chain["root"]), "--artifact", str(chain["quantized"]),
                 "--check", check=False)
    assert r.returncode == 2
    assert "no tensors for them (was inject-mtp run?)" in r.stderr and "Traceback" not in r.stderr


def test_artifact_without_injected_mtp_also_fails_in_vllm_itself(chain, serve_python):
    from mtpquant.core.checkpoint import read_json
    from mtpquant.model.families import family_for

    config = read_json(MODEL / "config.json")
    (prefix,) = family_for(config).mtp_prefixes(config)
    r = mtpquant(serve_python, "serve", "--run", str(chain["root"]), "--artifact", str(chain["quantized"]),
                 "--check", "--skip-checks", check=False)
    assert r.returncode == 2
    err = " ".join(r.stderr.split())
    assert "vLLM exited with code" in err and "before it was ready" in err
    assert "weights were not initialized from checkpoint" in err and prefix in err


def test_bench_with_and_without_mtp_and_report(chain, serve_python, evals):
    mtpquant(serve_python, "bench", "--run", str(chain["root"]), "--artifact", str(chain["artifact"]),
             "--grid", "tiny", "--name", "w4a16")
    out = chain["root"] / "bench"
    summary = json.loads((out / "bench.json").read_text())
    assert sorted((p["mtp"], p["concurrency"], p["repeat"]) for p in summary["points"]) == [
        (mtp, c, r) for mtp in (False, True) for c in (1, 8, 32) for r in range(3)]
    # interleaved: the two settings alternate which goes first at every concurrency
    assert summary["order"][:4] == ["mtp-c1-r0", "nomtp-c1-r0", "mtp-c8-r0", "nomtp-c8-r0"]
    assert summary["order"][6:8] == ["nomtp-c1-r1", "mtp-c1-r1"]
    for p in summary["points"]:
        assert p["result"]["completed"] >= 16 and p["result"]["output_throughput"] > 0
        assert p["vllm_command"].startswith("vllm bench serve --backend openai")
        # the client line that runs on CPU
        assert p["command"].startswith(f"{shlex.quote(serve_python)} -m mtpquant.serving.bench --backend openai")
        if p["mtp"]:
            assert p["result"]["spec_decode_acceptance_rate"] > 50
    for r in summary["table"]:
        assert r["mtp_speedup_min"] <= r["mtp_speedup"] * 1.5 and r["mtp_speedup_max"] >= r["mtp_speedup"] / 1.5
        assert r["verdict"] != "-" and r["acceptance_length"] > 1
        if r["verdict"] == "measured":  # a finding is inside the physical bound
            assert r["mtp_speedup"] <= r["acceptance_length"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Concurrency |" in (out / "bench.md").read_text()
    evals("w4a16")
    mtpquant(serve_python, "manifest", "--run", str(chain["root"]), "--artifact", str(chain["artifact"]))
    mtpquant(serve_python, "report", "--run", str(chain["root"]), "--artifact", str(chain["artifact"]))
    report = (chain["root"] / "report.md").read_text()
    for needle in ("## Verify", "Overall: **PASS**", "## Eval", "tiny_arith", "## Bench", "paired repetitions",
                   "vllm bench serve", "DEQUANTIZED", "## Artifact"):
        assert needle in report, needle


def test_vllm_picks_each_familys_mtp_draft_from_its_config(serve_python, tmp_path):
    """serve passes the generic `mtp` method (serve.speculative_config): vLLM itself must map each family's
    config to that family's MTP draft model (`Family.vllm_method`), and accept `mtp` as a method."""
    from mtpquant.model.families import FAMILIES
    from mtpquant.model.recipes import FixtureSpec

    for name, fam in FAMILIES.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(fam.fixture_config(FixtureSpec())))
    code = ("import json, sys\nfrom typing import get_args\nfrom transformers import AutoConfig\n"
            "from vllm.config.speculative import MTPModelTypes, SpeculativeConfig\n"
            "draft = {n: SpeculativeConfig.hf_config_override(AutoConfig.from_pretrained(sys.argv[1] + '/' + n))"
            ".model_type for n in sys.argv[2:]}\n"
            "print(json.dumps({'mtp': 'mtp' in get_args(MTPModelTypes), 'draft': draft}))")
    r = subprocess.run([serve_python, "-c", code, str(tmp_path), *FAMILIES], capture_output=True, text=True,
                       check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"mtp": True, "draft": {name: fam.vllm_method for name, fam in FAMILIES.items()}}
