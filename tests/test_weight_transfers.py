"""fast_experts.activations and fast_experts.overlap_weights: where the activations wait, and the weight
copies moved off the critical path, change no number. On a CPU the copies are CPU to CPU, so the queue is
forced (`WeightTransfers(force=True)`) to run the same code paths as on a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mtpquant.model.recipes import RECIPES_DIR, FixtureSpec


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mtpquant.tiny.fixture import write_fixture

    return write_fixture("glm_moe_dsa", FixtureSpec(), tmp_path_factory.mktemp("wt") / "base")


def recipe_with(tmp_path: Path, **fast) -> Path:
    recipe = yaml.safe_load((RECIPES_DIR / "quant" / "w4a16-asym-g128.yaml").read_text())
    recipe["fast_experts"].update(fast)
    p = tmp_path / f"quant-{len(list(tmp_path.glob('quant-*')))}.yaml"
    p.write_text(yaml.safe_dump(recipe))
    return p


def expert_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update({k: v for k, v in load_file(f).items() if ".experts." in k})
    return tensors


def test_overlap_and_gpu_activations_change_nothing(base, tmp_path, monkeypatch):
    from mtpquant.calib import weight_transfers
    from mtpquant.calib.quantize import quantize

    plain = quantize(base, str(recipe_with(tmp_path)), "tiny-local", tmp_path / "a")
    used: list[weight_transfers.WeightTransfers] = []
    init = weight_transfers.WeightTransfers.__init__

    def forced(self, force: bool = False) -> None:
        init(self, force=True)
        used.append(self)

    monkeypatch.setattr(weight_transfers.WeightTransfers, "__init__", forced)
    fast = quantize(base, str(recipe_with(tmp_path, overlap_weights=True, activations="gpu")), "tiny-local",
                    tmp_path / "b")
    assert fast["activations_on"] == "cpu"  # no GPU here: "gpu" falls back to where the pipeline runs
    (wt,) = used
    # decoder layers 0-2 prefetched (layer 0 at calibration start); every quantized weight queued
    assert wt.stats["prefetch_hits"] > 0 and wt.stats["prefetched_gb"] > 0
    assert wt.stats["written_back_gb"] > 0 and not wt._writes and not wt._prefetched
    timings = fast["seconds"]["expert_gptq"]
    assert timings["prefetch_hits"] == wt.stats["prefetch_hits"]
    a = {r["module"]: r["loss"] for r in plain["per_linear"]}
    b = {r["module"]: r["loss"] for r in fast["per_linear"]}
    assert a == b and len(a) == 48
    wa, wb = expert_weights(tmp_path / "a"), expert_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and len(wa) > 48
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # CPUCache is back to compressed-tensors' own methods
    from compressed_tensors.offload.cache.cpu import CPUCache

    assert CPUCache.onload.__module__.startswith("compressed_tensors")
    assert CPUCache.update_offload.__module__.startswith("compressed_tensors")


def test_queue_orders_reads_after_writes_and_drops_stale_prefetch():
    from compressed_tensors.offload import disable_offloading, update_offload_parameter
    from compressed_tensors.offload.cache.cpu import CPUCache

    from mtpquant.calib.weight_transfers import WeightTransfers

    lin = torch.nn.Linear(8, 4)
    lin._parameters = CPUCache.from_mapping(lin._parameters, "cpu")
    w0 = lin.weight.detach().clone()
    with WeightTransfers(force=True) as wt:
        assert wt.prefetch(lin)
        assert not wt.prefetch(lin)  # already queued
        torch.testing.assert_close(lin.weight, w0)
        assert wt.stats["prefetch_hits"] == 1
        wt.prefetch(lin)
        old = lin._parameters.offloaded_values["weight"]
        assert id(old) in wt._prefetched
        new = torch.full_like(w0, 3.0)
        update_offload_parameter(lin, "weight", new)  # drops the prefetched copy, queues the write
        assert id(old) not in wt._prefetched and id(old) in wt._writes
        torch.testing.assert_close(lin.weight, new)  # the onload waits for the queued write
        with disable_offloading():
            update_offload_parameter(lin, "weight", new + 1)
            torch.testing.assert_close(lin.weight, new + 1)
        wt.drain()
        torch.testing.assert_close(lin._parameters.offloaded_values["weight"], new + 1)
    assert CPUCache.onload.__module__.startswith("compressed_tensors")


def test_activation_device():
    import dataclasses

    from mtpquant.calib.quantize import activation_cache_bytes, activation_device, oneshot_options
    from mtpquant.model import recipes

    quant = recipes.load("quant", "w4a16-asym-g128")
    fe = quant.fast_experts

    def with_mode(mode: str):
        return dataclasses.replace(quant, fast_experts=dataclasses.replace(fe, activations=mode))

    h100 = ("cuda:0", 79 * 2**30)
    glm52 = activation_cache_bytes(6144, 768, 512)
    assert glm52 == int(1.25 * 768 * 512 * 6144 * 2)
    assert activation_device(with_mode("cpu"), glm52, h100) == "cpu"
    assert activation_device(with_mode("gpu"), 10**12, h100) == "cuda:0"
    assert activation_device(with_mode("auto"), glm52, h100) == "cuda:0"  # 6 GB of 85
    assert activation_device(with_mode("auto"), activation_cache_bytes(6144, 8192, 2048), h100) == "cpu"
    assert activation_device(dataclasses.replace(quant, fast_experts=None), 1, h100) == "cpu"
    if not torch.cuda.is_available():
        assert activation_device(with_mode("gpu"), 1) == "cpu"
    assert oneshot_options(quant, "cuda:0")["sequential_offload_device"] == "cuda:0"
    assert oneshot_options(quant)["sequential_offload_device"] == "cpu"


def test_recipe_refuses_unknown_activation_place(tmp_path):
    from mtpquant.core.errors import MtpquantError
    from mtpquant.model import recipes

    bad = recipe_with(tmp_path, activations="disk")
    with pytest.raises(MtpquantError, match="fast_experts.activations: 'disk' is not one of"):
        recipes.load("quant", bad)


def test_failed_prefetch_falls_back_to_a_plain_onload(monkeypatch):
    from compressed_tensors.offload.cache.cpu import CPUCache

    from mtpquant.calib.weight_transfers import WeightTransfers

    lin = torch.nn.Linear(8, 4)
    lin._parameters = CPUCache.from_mapping(lin._parameters, "cpu")
    w0 = lin.weight.detach().clone()
    with WeightTransfers(force=True) as wt:
        def boom(cache, t):
            raise RuntimeError("CUDA out of memory (simulated)")

        monkeypatch.setattr(wt, "_copy_in", boom)
        assert wt.prefetch(lin)
        torch.testing.assert_close(lin.weight, w0)
        assert wt.stats["prefetch_failed"] == 1 and wt.stats["prefetch_hits"] == 0
