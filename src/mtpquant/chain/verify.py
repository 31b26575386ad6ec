"""`verify`: prove the artifact is what it claims, from the files alone.

Checks: the index and shards agree; every routed-expert Linear of every MoE layer is packed as the config's
scheme says (mtpquant.model.schemes; and nothing else is); every MTP tensor is present, unquantized and
byte-identical to the base; the MTP layers are covered by `quantization_config.ignore`; unquantized tensors
keep the base's dtype and shape; config and tensors agree; every quantized Linear dequantizes (the scheme's
dequantizer: compressed-tensors' own decompressor) to its base weight
within the scheme's bounds. Exit code 3 names the failing tensors.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from mtpquant.core.checkpoint import Checkpoint, TensorInfo, read_safetensors_header, tensor_sha256
from mtpquant.core.errors import MtpquantError, VerificationFailed, printable
from mtpquant.core.progress import byte_progress
from mtpquant.model.families import Family, family_for, matches, model_type_of
from mtpquant.model.schemes import (
    DEFAULT,
    PACKED,
    QUANT_METHOD,
    SCHEMES,
    ZERO_POINT,
    PackedIntScheme,
    group_weights,
    scheme_of_weights,
)


@dataclass
class Check:
    name: str
    failures: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return not self.failures


def check_index(art: Checkpoint) -> Check:
    c = Check("index maps every tensor to exactly one existing shard")
    seen: dict[str, str] = {}
    for shard in sorted(set(art.weight_map.values())):
        if not (art.root / shard).is_file():
            c.failures.append(f"index points at missing shard {shard}")
    for path in art.shard_files():
        for name in read_safetensors_header(path):
            if name in seen:
                c.failures.append(f"{name} is in both {seen[name]} and {path.name}")
            seen[name] = path.name
            mapped = art.weight_map.get(name)
            if mapped is None:
                c.failures.append(f"{name} in {path.name} is not in the index")
            elif mapped != path.name:
                c.failures.append(f"{name} is in {path.name} but indexed in {mapped}")
    for name, shard in art.weight_map.items():
        if name not in seen and (art.root / shard).is_file():
            c.failures.append(f"{name} is indexed in {shard} but not there")
    c.detail = f"{len(art.weight_map)} tensors, {len(set(art.weight_map.values()))} shards"
    return c


def _quant_modules(names: Any) -> set[str]:
    return {n.rsplit(".", 1)[0] for n in names if n.endswith(f".{PACKED}")}


def _expected_parts(scheme: PackedIntScheme, src: TensorInfo | None) -> dict[str, tuple[str | None, Any]]:
    """part -> (dtype, shape) a module must have; without its base weight only the part names are known."""
    if src is None or len(src.shape) != 2:
        return {p: (dtype, None) for p, (dtype, _) in scheme.tensors(1, scheme.group_size).items()}
    return dict(scheme.tensors(*src.shape))


def check_experts(art: Checkpoint, base: Checkpoint, fam: Family, scheme: PackedIntScheme) -> Check:
    cfg = base.config
    expected = fam.routed_expert_linears(cfg)
    c = Check(f"every routed-expert Linear is INT{scheme.num_bits}-packed")
    t = art.tensors
    for mod in expected:
        need = _expected_parts(scheme, base.tensors.get(f"{mod}.weight"))
        for part, (dtype, shape) in need.items():
            info = t.get(f"{mod}.{part}")
            if info is None:
                c.failures.append(f"{mod}.{part} is missing")
            elif (dtype and info.dtype != dtype) or (shape and info.shape != shape):
                c.failures.append(f"{mod}.{part} is {info.dtype}{list(info.shape)}, expected "
                                  f"{dtype or 'any'}{list(shape) if shape else ''}")
        if f"{mod}.weight" in t:
            c.failures.append(f"{mod}.weight is present unquantized")
    bad = {f.split(" ")[0].rsplit(".", 1)[0] for f in c.failures}
    c.detail = (f"{len(fam.moe_layers(cfg))} MoE layers x {fam.num_experts(cfg)} experts x 3 = {len(expected)}, "
                f"{len(expected) - len(bad)} ok")
    return c


def check_nothing_else(art: Checkpoint, base: Checkpoint, fam: Family) -> Check:
    c = Check("nothing but routed experts is quantized")
    expected = set(fam.routed_expert_linears(base.config))
    for mod in sorted(_quant_modules(art.tensors) - expected):
        c.failures.append(f"{mod} is quantized ({fam.classify(mod, base.config)})")
    c.detail = f"{len(_quant_modules(art.tensors))} quantized modules"
    return c


def _mtp_names(ck: Checkpoint, fam: Family, cfg: dict[str, Any]) -> list[str]:
    prefixes = tuple(fam.mtp_prefixes(cfg))
    return sorted(n for n in ck.tensors if n.startswith(prefixes)) if prefixes else []


def check_mtp(art: Checkpoint, base: Checkpoint, fam: Family, workers: int) -> Check:
    c = Check("MTP tensors present, unquantized, byte-identical to base")
    base_names = _mtp_names(base, fam, base.config)
    art_names = set(_mtp_names(art, fam, base.config))
    if not base_names:
        c.failures.append("the base checkpoint has no MTP tensors")
    for n in base_names:
        if n not in art_names:
            c.failures.append(f"{n} is missing")
    for n in sorted(art_names - set(base_names)):
        c.failures.append(f"{n} is not in the base (quantized or foreign MTP tensor)")
    both = [n for n in base_names if n in art_names]
    for n in both:
        a, b = art.tensors[n], base.tensors[n]
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            c.failures.append(f"{n} is {a.dtype}{list(a.shape)}, base has {b.dtype}{list(b.shape)}")
    infos = [art.tensors[n] for n in both] + [base.tensors[n] for n in both]
    with byte_progress("hashing MTP tensors", sum(i.nbytes for i in infos)) as advance, \
            ThreadPoolExecutor(workers) as pool:
        def hash_one(info: TensorInfo) -> str:
            digest = tensor_sha256(info)
            advance(info.nbytes)
            return digest

        hashes = list(pool.map(hash_one, infos))
    a_hash, b_hash = hashes[: len(both)], hashes[len(both):]
    for n, ha, hb in zip(both, a_hash, b_hash, strict=True):
        if ha != hb:
            c.failures.append(f"{n} differs from the base (sha256 {ha[:12]} != {hb[:12]})")
    c.detail = f"{len(both)}/{len(base_names)} tensors, layers {fam.mtp_layers(base.config)}"
    return c


def check_mtp_ignored(art: Checkpoint, base: Checkpoint, fam: Family) -> Check:
    c = Check("MTP layers are in quantization_config.ignore")
    ignore = (art.config.get("quantization_config") or {}).get("ignore") or []
    modules = sorted({n.removesuffix(".weight") for n in _mtp_names(base, fam, base.config) if n.endswith(".weight")})
    for mod in modules:
        if not any(matches(p, mod) for p in ignore):
            c.failures.append(f"{mod} is not covered by ignore")
    c.detail = f"{len(modules)} MTP modules checked against {len(ignore)} ignore entries"
    return c


def check_unquantized(art: Checkpoint, base: Checkpoint, fam: Family) -> Check:
    c = Check("unquantized tensors keep the base's dtype and shape")
    expected = set(fam.routed_expert_linears(base.config))
    mtp = set(_mtp_names(base, fam, base.config))
    n = 0
    for name, b in base.tensors.items():
        if name in mtp or name.removesuffix(".weight") in expected:
            continue
        a = art.tensors.get(name)
        n += 1
        if a is None:
            if name.removesuffix(".weight") not in _quant_modules(art.tensors):
                c.failures.append(f"{name} is missing")
        elif (a.dtype, a.shape) != (b.dtype, b.shape):
            c.failures.append(f"{name} is {a.dtype}{list(a.shape)}, base has {b.dtype}{list(b.shape)}")
    c.detail = f"{n} tensors"
    return c


def check_config(art: Checkpoint, base: Checkpoint, fam: Family) -> tuple[Check, PackedIntScheme]:
    """Also returns the scheme the config describes (DEFAULT when it describes none: this check fails)."""
    c = Check("config agrees with base and tensors")
    for key in (*fam.match_keys(), fam.mtp_key):
        if art.config.get(key) != base.config.get(key):
            c.failures.append(f"config.json {key}={art.config.get(key)!r}, base has {base.config.get(key)!r}")
    qc = art.config.get("quantization_config")
    scheme = DEFAULT
    if not qc:
        c.failures.append("config.json has no quantization_config")
        return c, scheme
    formats = sorted({s.format for s in SCHEMES.values()})
    if qc.get("quant_method") != QUANT_METHOD or qc.get("format") not in formats:
        c.failures.append(f"quantization_config is {qc.get('quant_method')}/{qc.get('format')}, "
                          f"expected {QUANT_METHOD}/{'|'.join(formats)}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not all(isinstance(g, dict) for g in groups.values()):
        c.failures.append("quantization_config.config_groups is not a mapping of groups")
        return c, scheme
    for gname, w in group_weights(qc).items():
        found = scheme_of_weights(w, qc.get("format"))
        if found is None:
            c.failures.append(f"config_groups.{gname}: num_bits={w.get('num_bits')} strategy={w.get('strategy')} "
                              f"group_size={w.get('group_size')} symmetric={w.get('symmetric')} is no known "
                              f"scheme ({', '.join(SCHEMES)})")
        else:
            scheme = found
    targets = [t for g in groups.values() for t in g.get("targets") or [] if isinstance(t, str)]
    zero_points = [n for n in art.tensors if n.endswith(f".{ZERO_POINT}")]
    if scheme.symmetric and zero_points:
        c.failures.append(f"symmetric: true, but {len(zero_points)} zero points are stored (first: {zero_points[0]})")
    c.failures += target_mismatches(art, base, targets, qc.get("ignore") or [])
    c.detail = f"{scheme.name}: group_size={scheme.group_size}, {'symmetric' if scheme.symmetric else 'asymmetric'}"
    return c, scheme


def target_mismatches(art: Checkpoint, base: Checkpoint, targets: list[str], ignore: list[Any]) -> list[str]:
    """The config's targets minus its ignore list must select exactly the modules that are stored quantized:
    otherwise a loader reads the checkpoint differently from how it was written."""
    linears = {n.removesuffix(".weight") for n, t in base.tensors.items()
               if n.endswith(".weight") and len(t.shape) == 2}
    ignore = [i for i in ignore if isinstance(i, str)] if isinstance(ignore, list) else []
    regex = [t for t in targets if t.startswith("re:")]
    if not regex:
        return [] if not targets else [f"targets {targets} name classes: cannot be checked from the files"]
    selected = {m for m in linears if any(matches(t, m) for t in regex) and not any(matches(i, m) for i in ignore)}
    stored = _quant_modules(art.tensors)
    out = [f"targets select {m}, which is not stored quantized" for m in sorted(selected - stored)[:3]]
    out += [f"{m} is stored quantized, but the targets do not select it" for m in sorted(stored - selected)[:3]]
    extra = len(selected ^ stored) - len(out)
    return out + ([f"... {extra} more modules where targets and tensors disagree"] if extra > 0 else [])


def check_no_strays(art: Checkpoint, base: Checkpoint, scheme: PackedIntScheme) -> Check:
    """Every tensor of the artifact is one of the base's, or a part of the scheme's of a module the base has
    (a stored zero point of a symmetric scheme is the config check's failure)."""
    c = Check("no tensor the base does not explain")
    modules = {n.removesuffix(".weight") for n in base.tensors if n.endswith(".weight")}
    for name in sorted(art.tensors):
        mod, _, part = name.rpartition(".")
        if name not in base.tensors and not (part in scheme.LAYOUT_PARTS and mod in modules):
            c.failures.append(f"{name} ({art.tensors[name].shard.name}) is not in the base")
    c.detail = f"{len(art.tensors)} tensors"
    return c


# The value bounds (each scheme's max_error_vs_rtn and max_group_relative, mtpquant.model.schemes) of a GPTQ INT4 weight
# against its BF16 source, measured 2026-12-01 on the tests' tiny fixtures (both
# families, 96 expert Linears, random weights) and on the trained tiny-arith model (48 expert Linears, planted
# outlier channels, its own calibration): a module's relative Frobenius error is at most 1.45x (fixtures) and
# 1.78x (tiny-arith) the same weight's round-to-nearest error (GPTQ trades weight error for output error), and
# the worst group's error norm is at most 0.21x (fixtures) and 0.82x (tiny-arith) that group's weight norm.
# GPTQ's error compensation legitimately moves single elements by up to 11.8 INT4 steps (tiny-arith), so no
# per-element bound is sound; a single flipped nibble is found by hashes (`manifest`), not by values.
# Bounds with margin: a swapped or foreign expert (~14x RTN), a scale off by orders of magnitude, a zero point
# off by ~8 steps or garbage in a group lie far outside them.
# Without --sample, at most this many Linears are value-checked (a seeded sample beyond it, coverage printed):
# measured 1.45 s per GLM-5.2-shaped Linear on 2 cores (benchmarks/verify_values.py), so all 57,600 of GLM-5.2
# would take ~15 h there; 4096 take ~50 min on 2 cores and a few minutes on a GPU host's CPUs.
DEFAULT_MAX_LINEARS = 4096


def _load(infos: list[TensorInfo]) -> dict[str, Any]:
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for shard in sorted({i.shard for i in infos}):
        with safe_open(str(shard), "pt") as fh:
            out.update({i.name: fh.get_tensor(i.name) for i in infos if i.shard == shard})
    return out


def value_errors(mod: str, art: Checkpoint, base: Checkpoint, scheme: PackedIntScheme) -> dict[str, float]:
    """Dequantize one module with the scheme's dequantizer and measure it against the base weight."""
    import torch

    parts = _load([art.tensors[f"{mod}.{p}"] for p in scheme.parts() if f"{mod}.{p}" in art.tensors])
    w = _load([base.tensors[f"{mod}.weight"]])[f"{mod}.weight"]
    local = {k.rsplit(".", 1)[1]: v for k, v in parts.items()}
    w_hat = scheme.dequantize(local).float()
    w32 = w.float()
    if w_hat.shape != w32.shape:
        return {"shape": 1.0}
    err = w_hat - w32
    norm = w32.norm().clamp_min(1e-12)
    rtn = (scheme.rtn(w).float() - w32).norm() / norm
    n, k, group = *w32.shape, scheme.group_size
    groups, e = w32.reshape(n, k // group, group), err.reshape(n, k // group, group)
    return {"relative": float(err.norm() / norm), "rtn": float(rtn),
            "group_relative": float((e.norm(dim=-1) / groups.norm(dim=-1).clamp_min(1e-12)).max()),
            "finite": float(torch.isfinite(w_hat).all())}


def check_values(art: Checkpoint, base: Checkpoint, fam: Family, scheme: PackedIntScheme, workers: int,
                 sample: float | None = None, seed: int = 0) -> Check:
    """Every quantized Linear (or a seeded `sample` of them; by default all up to DEFAULT_MAX_LINEARS)
    dequantized and compared with its base weight."""
    import random

    from rich.progress import Progress

    c = Check("quantized weights dequantize to their base weights (within GPTQ's measured error)")
    mods = [m for m in fam.routed_expert_linears(base.config)
            if all(f"{m}.{p}" in art.tensors for p in scheme.parts()) and f"{m}.weight" in base.tensors]
    if sample is None:
        sample = min(1.0, DEFAULT_MAX_LINEARS / max(len(mods), 1))
    chosen = sorted(random.Random(seed).sample(mods, max(1, round(len(mods) * sample)))) if sample < 1 else mods
    worst: dict[str, float] = {}
    with Progress(console=Console(stderr=True), transient=True) as progress, ThreadPoolExecutor(workers) as pool:
        task = progress.add_task("dequantizing and comparing", total=len(chosen))

        def one(mod: str) -> tuple[str, dict[str, float] | str]:
            try:
                return mod, value_errors(mod, art, base, scheme)
            except Exception as exc:  # noqa: BLE001  (a corrupt packed tensor fails this check, named)
                return mod, f"cannot be dequantized ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            finally:
                progress.advance(task)

        for mod, r in pool.map(one, chosen):
            if isinstance(r, str):
                c.failures.append(f"{mod} {r}")
                continue
            if "shape" in r or not r["finite"]:
                c.failures.append(f"{mod}: dequantizes to a {'wrong shape' if 'shape' in r else 'non-finite'} weight")
                continue
            ratio = r["relative"] / max(r["rtn"], 1e-12)
            worst["vs_rtn"] = max(worst.get("vs_rtn", 0.0), ratio)
            worst["group"] = max(worst.get("group", 0.0), r["group_relative"])
            if ratio > scheme.max_error_vs_rtn:
                c.failures.append(f"{mod}: relative error {r['relative']:.3f} is {ratio:.2f}x its RTN error "
                                  f"{r['rtn']:.3f} (bound {scheme.max_error_vs_rtn}x)")
            elif r["group_relative"] > scheme.max_group_relative:
                c.failures.append(f"{mod}: a group's error is {r['group_relative']:.2f}x that group's weight norm "
                                  f"(bound {scheme.max_group_relative}x)")
    coverage = f"{len(chosen)}/{len(mods)} Linears" + (f" (seeded sample {sample:g}, seed {seed})"
                                                       if sample < 1 else "")
    c.detail = coverage + (f"; worst: {worst['vs_rtn']:.2f}x its RTN error, a group's error "
                           f"{worst['group']:.2f}x its weight" if worst else "")
    return c


def run_checks(art: Checkpoint, base: Checkpoint, fam: Family, workers: int,
               sample: float | None = None) -> list[Check]:
    idx = check_index(art)
    checks = [idx]
    if idx.ok:  # the tensor checks need a consistent index
        cfg, scheme = check_config(art, base, fam)
        experts = check_experts(art, base, fam, scheme)
        checks += [experts, check_nothing_else(art, base, fam), check_no_strays(art, base, scheme),
                   check_mtp(art, base, fam, workers), check_mtp_ignored(art, base, fam),
                   check_unquantized(art, base, fam), cfg]
        if experts.ok:  # values need the tensors the format check found
            checks.insert(2, check_values(art, base, fam, scheme, workers, sample))
    return checks


def verify(artifact: Path, base_dir: Path, workers: int = 8, sample: float | None = None) -> list[Check]:
    art, base = Checkpoint(artifact), Checkpoint(base_dir)
    if art.root.resolve() == base.root.resolve():
        raise MtpquantError(f"{base.root}: --base is the artifact itself; give the BF16 checkpoint it was made from")
    fam = family_for(base.config, str(base.root / "config.json"))
    if base.config.get("quantization_config"):
        raise MtpquantError(f"{base.root / 'config.json'}: the base is itself quantized (quantization_config); "
                            "give the BF16 checkpoint the artifact was made from")
    base.tensors  # noqa: B018  (a base that cannot be read is the user's input: one line, exit 2)
    if model_type_of(art.config) != fam.model_type:
        raise MtpquantError(f"{art.root / 'config.json'}: model_type {model_type_of(art.config)!r} does not "
                            f"match the base's {fam.model_type!r}")
    try:
        checks = run_checks(art, base, fam, workers, sample)
    except MtpquantError as exc:  # a truncated or corrupt artifact file fails verification like any other defect
        checks = [Check("artifact files are readable safetensors", [str(exc)])]
    return checks


def verify_record(artifact: Path, base_dir: Path, checks: list[Check]) -> dict[str, Any]:
    return {"stage": "verify", "artifact": str(Path(artifact)), "base": str(Path(base_dir)),
            "ok": all(c.ok for c in checks), "checks": [asdict(c) | {"ok": c.ok} for c in checks]}


def render(checks: list[Check], title: str) -> Any:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(printable(title)))
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail")
    for c in checks:  # details and failures name tensors from the files: plain text, never rich markup
        result = "[green]PASS[/]" if c.ok else f"[red]FAIL ({len(c.failures)})[/]"
        lines = [c.detail] if c.ok else c.failures[:5] + ([f"... {len(c.failures) - 5} more"]
                                                          if len(c.failures) > 5 else [])
        table.add_row(c.name, result, Text("\n".join(printable(line) for line in lines)))
    return table


def raise_on_failure(checks: list[Check]) -> None:
    failed = [f for c in checks for f in c.failures]
    if failed:
        raise VerificationFailed(f"verify: {len(failed)} problem(s): " + "; ".join(failed[:3])
                                 + (" ..." if len(failed) > 3 else ""))
