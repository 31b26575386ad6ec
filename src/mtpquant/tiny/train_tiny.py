"""Train the tiny GLM-4.5-layout model that knows something: multi-step arithmetic (mtpquant.tiny.tiny_task).

A `Glm4MoeForCausalLM` (transformers' own modules, so the weights mean the same thing in vLLM) whose routed
experts carry most of the parameters, plus one MTP layer trained exactly as vLLM's `glm4_moe_mtp.py`
drafter computes it:

    h_t   = the target's final *normed* hidden state at position t (what the target model returns)
    e     = embed(token_{t+1}), zeroed at position 0 ("masking inputs at position 0")
    x     = eh_proj(cat[enorm(e), hnorm(h_t)])          # eh_proj: [H, 2H], embedding half first
    y     = decoder_block(x, position t) ; logits = shared_head.head(shared_head.norm(y))  -> token_{t+2}

`shared_head.head` is tied to `lm_head` while training and written as a copy: vLLM's MTP loader maps
`lm_head.weight` onto `shared_head.head.weight`, so the two must agree. The routers use DeepSeek's
auxiliary-loss-free balancing (a sign update of `e_score_correction_bias`), so every expert is used.

The saved weights get planted outlier channels (`plant_outliers`, function-preserving; see there and the README).
`--init` continues from a checkpoint written here (planting undone first) with a fresh optimizer and schedule.

Deterministic: one thread count, seeded data and init, fixed step count; same command, same bytes
(on the same torch build). Output: the real on-disk layout via `mtpquant.tiny.fixture.write_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mtpquant.model.recipes import FixtureSpec
from mtpquant.tiny.fixture import config_for, unfuse_experts, write_checkpoint
from mtpquant.tiny.tiny_task import problems

FAMILY = "glm4_moe"  # GLM-4.5 only: vLLM's glm4_moe_mtp drafter, built from transformers' Glm4Moe modules
SPEC = FixtureSpec(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2,
                   num_nextn_predict_layers=1, hidden_size=256, moe_intermediate_size=128, intermediate_size=256,
                   num_shards=2, seed=0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3  # 3e-3 plateaus at ~0.1 accuracy (benchmarks/tiny_sweep.py)
    warmup: int = 100
    weight_decay: float = 0.01
    mtp_weight: float = 0.5
    bias_update: float = 1e-3  # aux-loss-free balancing step for e_score_correction_bias
    min_steps: int = 2  # reasoning steps per problem
    max_steps: int = 3
    operand_max: int = 99
    layers: int = 3  # decoder layers (the first dense, the rest MoE), MTP layer not counted
    seed: int = 0
    threads: int = 1  # more threads lose to contention on a shared 2-core machine (5x slower seen)


def encode(tok: Any, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Right-padded token ids and a mask of the answer tokens (loss is taken on the answer only)."""
    import torch

    seqs, masks = [], []
    for r in rows:
        q = tok(r["question"], add_special_tokens=False)["input_ids"]
        a = tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(q + a)
        masks.append([0] * len(q) + [1] * len(a))
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, mask


class MTPLayer:
    """Builds vLLM's Glm4MoeMultiTokenPredictorLayer from transformers' parts (see module docstring)."""

    def __init__(self, model: Any, layer_idx: int) -> None:
        """The MTP layer of `model` (a Glm4MoeForCausalLM): its sizes are the model's own (its final norm)."""
        import torch
        from transformers.models.glm4_moe import modeling_glm4_moe as m

        h, eps = model.model.norm.weight.shape[0], model.model.norm.variance_epsilon
        self.modules = torch.nn.ModuleDict({
            "enorm": m.Glm4MoeRMSNorm(h, eps=eps),
            "hnorm": m.Glm4MoeRMSNorm(h, eps=eps),
            "eh_proj": torch.nn.Linear(2 * h, h, bias=False),
            "block": m.Glm4MoeDecoderLayer(model.config, layer_idx),
            "shared_norm": m.Glm4MoeRMSNorm(h, eps=eps),
        })

    def forward(self, model: Any, ids: Any, hidden: Any) -> Any:
        """Logits for token t+2 at every position t < T-1 (ids: [B, T], hidden: the target's normed [B, T, H])."""
        import torch

        mm = self.modules
        emb = model.model.embed_tokens(ids[:, 1:])  # token t+1 at position t
        t = emb.shape[1]
        pos = torch.arange(t, device=ids.device).unsqueeze(0)
        emb = torch.where(pos.unsqueeze(-1) == 0, 0, emb)
        x = mm["eh_proj"](torch.cat([mm["enorm"](emb), mm["hnorm"](hidden[:, :t])], dim=-1))
        rope = model.model.rotary_emb(x, position_ids=pos)
        mask = torch.full((t, t), float("-inf"), device=ids.device).triu(1)[None, None]
        y = mm["block"](x, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        return model.lm_head(mm["shared_norm"](y))

    def tensors(self, prefix: str, lm_head: Any) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        names = {"enorm": "enorm", "hnorm": "hnorm", "eh_proj": "eh_proj", "shared_norm": "shared_head.norm"}
        for key, name in names.items():
            out[f"{prefix}{name}.weight"] = self.modules[key].weight.detach()
        for name, t in self.modules["block"].state_dict().items():
            out.update(unfuse_experts(prefix + name, t.detach()))
        out[f"{prefix}shared_head.head.weight"] = lm_head.detach().clone()
        return {k: (v.to(torch.float32) if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16))
                for k, v in out.items()}


def routers(model: Any, mtp: MTPLayer) -> list[Any]:
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    mods = list(model.modules()) + list(mtp.modules.modules())
    return [m for m in mods if isinstance(m, Glm4MoeTopkRouter)]


def balance_hooks(gates: list[Any], counts: dict[int, Any]) -> list[Any]:
    import torch

    def hook(mod: Any, _inp: Any, out: Any) -> None:
        counts[id(mod)] = counts.get(id(mod), 0) + torch.bincount(out[2].reshape(-1), minlength=mod.num_experts)

    return [g.register_forward_hook(hook) for g in gates]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def spec_for(cfg: TrainConfig) -> FixtureSpec:
    return dataclasses.replace(SPEC, num_hidden_layers=cfg.layers)


def tokenizer(workdir: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    from mtpquant.tiny.fixture import write_tokenizer

    write_tokenizer(workdir)
    return PreTrainedTokenizerFast.from_pretrained(workdir)


def fuse_experts(tensors: dict[str, Any]) -> dict[str, Any]:
    """On-disk per-expert tensors -> transformers' fused `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]."""
    import re

    import torch

    out, groups = {}, {}
    pat = re.compile(r"^((?:.*\.)?mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$")
    for name, t in tensors.items():
        m = pat.match(name)
        if m:
            groups.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = t
        else:
            out[name] = t
    for prefix, parts in groups.items():
        n = 1 + max(e for e, _ in parts)
        out[prefix + "gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]])
                                                    for e in range(n)])
        out[prefix + "down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return out


def load_init(model: Any, mtp: MTPLayer, init: Path, spec: FixtureSpec) -> None:
    """Start from a checkpoint this module wrote (target and MTP layer); the optimizer starts fresh."""
    import torch
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in sorted(Path(init).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    outliers = json.loads((Path(init) / "training.json").read_text()).get("outliers")
    if outliers:  # train on the weights as learned, not on the planted parametrization
        plant_outliers(tensors, spec, 1 / outliers["scale"], channels=outliers["channels"])
    p = f"model.layers.{spec.num_hidden_layers}."
    main = fuse_experts({k: v for k, v in tensors.items() if not k.startswith(p)})
    model.load_state_dict({k: v.to(torch.float32) for k, v in main.items()}, strict=True)
    own = {k.removeprefix(p): v.to(torch.float32) for k, v in tensors.items() if k.startswith(p)}
    mm = mtp.modules
    names = (("enorm", "enorm"), ("hnorm", "hnorm"), ("eh_proj", "eh_proj"), ("shared_norm", "shared_head.norm"))
    for key, name in names:
        mm[key].weight.data.copy_(own.pop(f"{name}.weight"))
    own.pop("shared_head.head.weight")  # tied to lm_head while training
    mm["block"].load_state_dict(fuse_experts(own), strict=True)


def fit(cfg: TrainConfig, tok: Any, device: str = "cpu", on_step: Any = None,
        init: Path | None = None) -> tuple[Any, MTPLayer, list[Any]]:
    """Train target and MTP layer together (the MTP loss does not reach the target: h_t is detached)."""
    import torch
    import transformers

    torch.manual_seed(cfg.seed)
    if device == "cpu":
        torch.set_num_threads(cfg.threads)
    else:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True)
    spec = spec_for(cfg)
    config = config_for(FAMILY, spec)
    config.dtype = torch.float32
    model = transformers.Glm4MoeForCausalLM(config).train()
    mtp = MTPLayer(model, spec.num_hidden_layers)
    mtp.modules.apply(model._init_weights)  # transformers only initializes modules inside the model
    if init is not None:
        load_init(model, mtp, init, spec)
    model.to(device)
    mtp.modules.to(device)
    params = list(model.parameters()) + list(mtp.modules.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    gates = routers(model, mtp)
    counts: dict[int, Any] = {}
    hooks = balance_hooks(gates, counts)
    data_seed = 10_000 + cfg.seed  # disjoint from the eval (seed 1) and calibration (seed 2) sets
    log = []
    for step in range(cfg.steps):
        rows = problems(data_seed + step, cfg.batch, cfg.min_steps, cfg.max_steps, cfg.operand_max)
        ids, mask = (t.to(device) for t in encode(tok, rows))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        counts.clear()
        hidden = model.model(input_ids=ids).last_hidden_state
        logits = model.lm_head(hidden)
        lm = torch.nn.functional.cross_entropy(logits[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        mtp_logits = mtp.forward(model, ids, hidden.detach())[:, :-1]  # position t predicts token t+2
        mtp_mask = mask[:, 2:]
        mtp_loss = torch.nn.functional.cross_entropy(mtp_logits[mtp_mask], ids[:, 2:][mtp_mask])
        loss = lm + cfg.mtp_weight * mtp_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for g in gates:
                c = counts[id(g)].float()
                g.e_score_correction_bias += cfg.bias_update * torch.sign(c.mean() - c)
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "lm": round(lm.item(), 4), "mtp": round(mtp_loss.item(), 4)})
        if on_step:
            on_step(step, lm.item(), mtp_loss.item())
    for h in hooks:
        h.remove()
    model.eval()
    return model, mtp, log


def train(cfg: TrainConfig, out: Path, on_step: Any = None, device: str = "cpu",
          init: Path | None = None) -> dict[str, Any]:
    import torch
    import transformers

    tok_dir = Path(tempfile.mkdtemp(prefix="mtpquant-tok-"))
    init_config = json.loads((Path(init) / "training.json").read_text())["config"] if init else None
    model, mtp, log = fit(cfg, tokenizer(tok_dir), device, on_step, init)
    model.cpu()
    mtp.modules.cpu()
    spec = spec_for(cfg)
    tensors: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        t = t.to(torch.float32) if name.endswith("e_score_correction_bias") else t.to(torch.bfloat16)
        tensors.update(unfuse_experts(name, t))
    tensors.update(mtp.tensors(f"model.layers.{spec.num_hidden_layers}.", model.lm_head.weight))
    planted = plant_outliers(tensors, spec)
    shutil.rmtree(tok_dir, ignore_errors=True)
    record = {"config": asdict(cfg), "spec": asdict(spec), "device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "log": log,
              "outliers": {"scale": OUTLIER_SCALE, "channels_per_moe_layer": OUTLIER_CHANNELS,
                           "channels": planted},
              "init": init_config}

    def finish(tmp: Path) -> None:
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / SUMS).write_text(sha256sums(tmp))

    write_checkpoint(FAMILY, spec, tensors, out, finish)
    return record


SUMS = "SHA256SUMS"


def sha256sums(root: Path) -> str:
    """`sha256sum -c`-compatible lines for every file but SHA256SUMS itself."""
    return "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                   for p in sorted(root.iterdir()) if p.is_file() and p.name != SUMS)


def accuracy(model: Any, tok: Any, rows: list[dict[str, Any]], batch: int = 100) -> float:
    """Exact-match accuracy of the `#### N` answer under greedy decoding with transformers (a quick check
    while training; the numbers that count come from vLLM + lm-eval)."""
    import torch

    tok.padding_side = "left"
    device = next(model.parameters()).device
    right = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        enc = tok([r["question"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc.to(device), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for r, g in zip(chunk, gen[:, enc["input_ids"].shape[1]:], strict=True):
            text = tok.decode(g, skip_special_tokens=True).split("\n")[0]
            right += text.strip().endswith(f"#### {r['result']}")
    tok.padding_side = "right"
    return right / len(rows)


def mtp_agreement(model: Any, mtp: MTPLayer, tok: Any, rows: list[dict[str, Any]]) -> float:
    """How often the MTP layer's top-1 for token t+2 equals the target's own top-1 at t+1, on answer tokens
    (teacher-forced on the reference answers): what k=1 MTP acceptance measures."""
    import torch

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in encode(tok, rows))
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        target = model.lm_head(hidden).argmax(-1)[:, 1:]  # the target's prediction for token t+2
        draft = mtp.forward(model, ids, hidden).argmax(-1)
    m = mask[:, 2:]
    return (draft[:, :-1][m] == target[:, :-1][m]).float().mean().item()


OUTLIER_SCALE = 16.0  # a power of two: exact in BF16
OUTLIER_CHANNELS = 8


def plant_outliers(tensors: dict[str, Any], spec: FixtureSpec, scale: float = OUTLIER_SCALE,
                   k: int = OUTLIER_CHANNELS, channels: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Give the routed experts the outlier input channels real LLMs have, without changing the function.

    In every MoE layer (MTP layer excluded), the k hidden channels with the largest post-attention RMSNorm gain
    get that gain divided by `scale` and the matching input columns of every consumer of the normed hidden state
    (router, shared expert, every routed expert's gate/up) multiplied by it. Powers of two are exact in BF16, so
    the model computes the same thing. A group of 128 input columns then holds a few weights 16x larger than
    the rest: round-to-nearest INT4 spends its range on them and loses the others (the failure GPTQ, which
    weighs rounding errors by the layer's inputs, is built to avoid). Trained for minutes, the tiny model has
    no such outliers of its own, and RTN INT4 then costs it almost nothing (0.755 -> 0.75 accuracy measured),
    which would make the GPTQ-vs-RTN comparison meaningless.
    """
    import torch

    planted = {}
    for layer in range(spec.first_k_dense_replace, spec.num_hidden_layers):
        p = f"model.layers.{layer}."
        gain = tensors[p + "post_attention_layernorm.weight"]
        if channels is None:
            idx = torch.topk(gain.float().abs(), k).indices.sort().values
        else:  # undo a planting (scale < 1) at the recorded channels
            idx = torch.tensor(channels[str(layer)])
        planted[str(layer)] = idx.tolist()
        gain = gain.clone()
        gain[idx] = (gain[idx].float() / scale).to(gain.dtype)
        tensors[p + "post_attention_layernorm.weight"] = gain
        consumers = [p + "mlp.gate.weight", p + "mlp.shared_experts.gate_proj.weight",
                     p + "mlp.shared_experts.up_proj.weight"]
        consumers += [p + f"mlp.experts.{e}.{w}_proj.weight"
                      for e in range(spec.n_routed_experts) for w in ("gate", "up")]
        for name in consumers:
            w = tensors[name].clone()
            w[:, idx] = (w[:, idx].float() * scale).to(w.dtype)
            tensors[name] = w
    return planted


def run_training(cfg: TrainConfig, out: Path, console: Any, device: str = "cpu",
                 init: Path | None = None) -> dict[str, Any]:
    """`mtpquant train-tiny`: task data files, then the model (with progress), then a quick accuracy check."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mtpquant.model.recipes import REPO_ROOT
    from mtpquant.tiny.tiny_task import write_data

    for p in write_data(REPO_ROOT):
        console.print(f"[green]wrote[/] {p.relative_to(REPO_ROOT)}")
    progress = Progress(TextColumn("[bold]train-tiny[/] {task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(), TimeRemainingColumn())
    with progress:
        task = progress.add_task("", total=cfg.steps)

        def on_step(step: int, lm: float, mtp: float) -> None:
            progress.update(task, completed=step + 1, description=f"lm {lm:.3f} mtp {mtp:.3f}")

        record = train(cfg, Path(out), on_step, device, init)
    console.print(f"[green]trained[/] {out} ({len(record['log'])} log points); SHA256SUMS written")
    return record
