"""The parts of ``benchmarks/gpu_check.sh`` (one sub-command each; the shell script times and orders them).

Everything here assumes no internet: timm models are random-init, the fine-tuning step uses synthetic
ImageNet-shaped tensors, the flows use the embedded digits data and the embedded tiny LLM. Each part
writes its results (CSV / markdown / JSON) into ``--out`` and prints one ``RESULT:`` line; a part whose
check fails exits non-zero with one ``FAILED:`` line.

    python benchmarks/gpu_check.py env          --out DIR   # CUDA present? GPU name, capability, bf16
    python benchmarks/gpu_check.py demo-check   --out DIR --store STORE   # the demo run's records say CUDA
    python benchmarks/gpu_check.py latency      --out DIR   # ResNet-50 @ 2.06G: Table-3 rows, GPU columns
    python benchmarks/gpu_check.py train-step   --out DIR   # inline fine-tuning step, CPU vs GPU images/s
    python benchmarks/gpu_check.py llm-check    --out DIR --summary JSON  # the LLM run says CUDA, bf16
    python benchmarks/gpu_check.py report       --out DIR   # gpu_check.md from parts.csv and the above

``--dry-run-cpu`` (``GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh``) runs the same parts with the CPU
in place of the GPU and expects the records to say so: it checks the script on a machine without one and
proves nothing about CUDA.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def result(msg: str) -> None:
    print(f"RESULT: {msg}", flush=True)


def fail(msg: str) -> int:
    print(f"FAILED: {msg}", flush=True)
    return 1


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------- env
def cmd_env(args) -> int:
    import torch

    from pruning.device import cpu_name, cuda_device_count, describe_device

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "cuda_devices": cuda_device_count(),
            "cpu": cpu_name(), "cpu_threads": torch.get_num_threads()}
    if info["cuda_devices"]:
        info.update(describe_device("cuda:0").model_dump())
    (args.out / "env.json").write_text(json.dumps(info, indent=2))
    if args.dry_run_cpu:
        result(f"dry run on the CPU ({info['cpu']}, torch {info['torch']}): nothing here checks CUDA")
        return 0
    if not info["cuda_devices"]:
        return fail(f"no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                    "this check needs a GPU")
    result(f"{info['name']} ({info['device']}, capability {info['capability']}, {info['memory_gib']} GiB, "
           f"autocast {info['amp']}), torch {info['torch']} CUDA {info['cuda_build']}, CPU {info['cpu']}")
    return 0


# --------------------------------------------------------------------------- demo flow
def cmd_demo_check(args) -> int:
    from pruning.artifacts import open_store, runs

    store = open_store(str(args.store))
    listed = runs.list_runs(store)
    if len(listed) != 1:
        return fail(f"expected one run in {args.store}, found {len(listed)}")
    run_id = listed[0]["run_id"]
    history = runs.read_history(store, run_id)
    final = store.get_json(runs.key(run_id, "final/model.json"))
    rows = [{k: r.get(k) for k in ("revision", "candidate", "status", "in_band", "achieved_macs", "accuracy_before",
                                   "accuracy_after", "device", "device_name")} for r in history]
    rows.append({"revision": "final", "status": "extended fine-tuning", "accuracy_after": final.get("test_accuracy"),
                 "device": final.get("device"), "device_name": final.get("device_name")})
    write_csv(args.out / "demo_records.csv", rows)
    tuned = [r for r in history if r.get("accuracy_after") is not None]
    if not tuned:
        return fail(f"run {run_id}: no fine-tuned record")
    want = "cpu" if args.dry_run_cpu else "cuda"
    off = [f"r{r['revision']}c{r.get('candidate', 0)}: {r.get('device')}" for r in tuned
           if not str(r.get("device") or "").startswith(want)]
    if off:
        return fail(f"run {run_id}: fine-tuned records not on {want}: {', '.join(off)}")
    if not str(final.get("device", "")).startswith(want):
        return fail(f"run {run_id}: extended fine-tuning ran on {final.get('device')}")
    result(f"run {run_id}: {len(tuned)} fine-tuned record(s) on {tuned[0]['device']} ({tuned[0]['device_name']}), "
           f"extended fine-tuning on {final['device']} (autocast {final.get('amp_dtype')}), test accuracy "
           f"{final['test_accuracy']:.4f}")
    return 0


# --------------------------------------------------------------------------- latency rows
def cmd_latency(args) -> int:
    import timm
    import torch

    from pruning.engine import prune_to_target
    from pruning.measure.latency_table import LatencyConfig, latency_report
    from pruning.plan import PruningPlan
    from pruning.solver import MacBand
    from pruning.space import example_input

    torch.manual_seed(0)
    t = time.perf_counter()
    original = timm.create_model("resnet50", pretrained=False).eval()  # random init: latency needs no weights
    example = example_input(224)
    pruned, res, _ = prune_to_target(original, example, PruningPlan(), MacBand(target_macs=2.06e9, overshoot_pct=5,
                                                                               undershoot_pct=15))
    prune_s = time.perf_counter() - t
    cfg = LatencyConfig(cpu_batch_sizes=(8,), runs=3 if args.dry_run_cpu else args.cpu_runs, warmup=3, gpu_batch_size=256,
                        gpu_warmup=args.gpu_warmup, gpu_runs=args.gpu_runs, compile=True, gpu_device="cuda:0")
    report = latency_report(original, pruned.eval(), (3, 224, 224), cfg,  # ONNX files in a temporary directory
                            names=("resnet50", "resnet50-2.06G"))
    report.to_csv(args.out / "latency_resnet50.csv")
    (args.out / "latency_resnet50.md").write_text(report.to_markdown())
    (args.out / "latency_resnet50.json").write_text(report.model_dump_json(indent=2))
    rows = report.rows
    if rows[1].gpu_latency_ms is None and not args.dry_run_cpu:
        gpu = report.gpu.get(rows[1].model)
        return fail(f"no GPU columns: {getattr(gpu, 'reason', gpu)}")
    gpu = (f"GPU bs256 {rows[0].gpu_latency_ms:.2f} -> {rows[1].gpu_latency_ms:.2f} ms (x{rows[1].gpu_speedup:.2f}, "
           f"{rows[1].gpu_mode}, peak {rows[1].peak_gpu_mem_mb:.0f} MB) on {rows[1].gpu_device}"
           if rows[1].gpu_latency_ms is not None else "no GPU columns (dry run)")
    result(f"ResNet-50 {rows[0].macs_g:.3f} -> {rows[1].macs_g:.3f} G MACs (pruned in {prune_s:.1f} s, in band "
           f"{res.in_band}); {gpu}; CPU bs8 {rows[0].cpu[0].median_ms:.1f} -> {rows[1].cpu[0].median_ms:.1f} ms")
    return 0


# --------------------------------------------------------------------------- one inline fine-tuning step
def _images_per_s(model, device: str, batch: int, steps: int, warmup: int) -> dict:
    """Images/s of the inline fine-tuning loop (:func:`pruning.train.finetune._train_epoch`, the code the
    flow runs) on synthetic ImageNet-shaped batches, with the precision it picks on ``device``."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pruning.train.finetune import (
        FinetuneConfig,
        _build_optimizer,
        _train_epoch,
        precision_for,
        restore_format,
    )

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    n = batch * max(steps, warmup)
    data = TensorDataset(torch.randn(n, 3, 224, 224, generator=gen), torch.randint(0, 1000, (n,), generator=gen))
    loader = DataLoader(data, batch_size=batch, pin_memory=dev.type == "cuda")
    model.to(dev)
    cfg = FinetuneConfig(lr=0.01, max_train_batches=warmup, progress_bar=False)
    prec = precision_for(model, cfg, dev)
    opt = _build_optimizer(model, cfg.resolve_hparams(model), cfg)
    _train_epoch(model, loader, opt, cfg, dev, desc="warmup", prec=prec, bar=False)  # cudnn autotune, allocator
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    cfg = cfg.model_copy(update={"max_train_batches": steps})
    t = time.perf_counter()
    _train_epoch(model, loader, opt, cfg, dev, desc="timed", prec=prec, bar=False)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t
    restore_format(model, prec)
    model.to("cpu")
    return {"device": str(dev), "batch": batch, "steps": steps, "seconds": round(seconds, 3),
            "images_per_s": round(batch * steps / seconds, 1),
            "amp": str(prec.dtype).replace("torch.", "") if prec.dtype else "fp32", "channels_last": prec.channels_last}


def cmd_train_step(args) -> int:
    import timm
    import torch

    from pruning.device import cpu_name, device_name

    torch.manual_seed(0)
    gpu = "cpu" if args.dry_run_cpu else "cuda:0"
    if args.dry_run_cpu:  # two CPU rows: small, only the mechanics are checked
        args.batch, args.cpu_steps, args.gpu_steps = min(args.batch, 8), 1, 1
    model = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    rows = [{**_images_per_s(model, "cpu", args.batch, args.cpu_steps, 1), "name": cpu_name(),
             "threads": torch.get_num_threads()},
            {**_images_per_s(model, gpu, args.batch, args.gpu_steps, 3), "name": device_name(gpu)}]
    write_csv(args.out / "train_step_resnet50.csv", rows)
    cpu, gpu = rows
    result(f"ResNet-50 224x224 inline fine-tuning step, batch {args.batch}: CPU {cpu['images_per_s']} img/s "
           f"({cpu['threads']} threads, fp32), {gpu['device']} {gpu['images_per_s']} img/s ({gpu['amp']}, "
           f"channels_last {gpu['channels_last']}) = x{gpu['images_per_s'] / cpu['images_per_s']:.1f}")
    return 0


# --------------------------------------------------------------------------- LLM pruning
def cmd_llm_check(args) -> int:
    s = json.loads(args.summary.read_text())
    (args.out / "llm_summary.json").write_text(json.dumps(s, indent=2))
    want, dtype = ("cpu", "float32") if args.dry_run_cpu else ("cuda", "bfloat16")
    if not str(s.get("device", "")).startswith(want):
        return fail(f"the LLM run held its model on {s.get('device')}")
    if s.get("dtype") != dtype:
        return fail(f"the LLM run computed in {s.get('dtype')}, not {dtype}")
    if s.get("peak_memory_gib") is None and not args.dry_run_cpu:
        return fail("the LLM run reported no peak GPU memory")
    result(f"tiny LLM on {s['device']} ({s['device_name']}) in {s['dtype']}: sparsity {s['final_sparsity']:.4f} "
           f"(target {s['target_sparsity']}), val ppl {s['baseline_val_ppl']:.3f} -> {s['final_val_ppl']:.3f}, "
           f"{s['iterations']} iterations, {s['rollbacks']} rollbacks, peak GPU memory {s['peak_memory_gib']} GiB, "
           f"{s['seconds']:.1f} s")
    return 0


# --------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    parts_csv = args.out / "parts.csv"
    parts = list(csv.DictReader(parts_csv.open())) if parts_csv.is_file() else []
    lines = ["# GPU check", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by benchmarks/gpu_check.sh.", ""]
    env = args.out / "env.json"
    if env.is_file():
        e = json.loads(env.read_text())
        lines += [f"GPU: {e.get('name', 'none')} ({e.get('device', '-')}, capability {e.get('capability', '-')}, "
                  f"{e.get('memory_gib', '-')} GiB, autocast {e.get('amp', '-')}); torch {e['torch']} (CUDA "
                  f"{e['cuda_build']}); CPU: {e['cpu']}, {e['cpu_threads']} torch threads.", ""]
    lines += ["| part | status | seconds | result |", "|---|---|---:|---|"]
    for p in parts:
        lines.append(f"| {p['part']} | {p['status']} | {p['seconds']} | {p['result'].replace('|', '/')} |")
    for name, title in (("latency_resnet50.md", "Latency: ResNet-50 @ 2.06 G MACs (paper Table 3 columns)"),):
        path = args.out / name
        if path.is_file():
            lines += ["", f"## {title}", "", path.read_text().strip()]
    for name, title in (("train_step_resnet50.csv", "Inline fine-tuning step, ResNet-50 224x224"),
                        ("demo_records.csv", "Demo run: history records")):
        path = args.out / name
        if path.is_file():
            rows = list(csv.DictReader(path.open()))
            if rows:
                keys = list(rows[0])
                lines += ["", f"## {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if parts and all(p["status"] == "ok" for p in parts) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("env", cmd_env), ("demo-check", cmd_demo_check), ("latency", cmd_latency),
                     ("train-step", cmd_train_step), ("llm-check", cmd_llm_check), ("report", cmd_report)):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--dry-run-cpu", action="store_true", help="the CPU in place of the GPU (checks the script)")
        p.set_defaults(func=fn)
        if name == "demo-check":
            p.add_argument("--store", type=Path, required=True)
        if name == "llm-check":
            p.add_argument("--summary", type=Path, required=True)
        if name == "latency":
            p.add_argument("--cpu-runs", type=int, default=10)
            p.add_argument("--gpu-runs", type=int, default=30)
            p.add_argument("--gpu-warmup", type=int, default=5)
        if name == "train-step":
            p.add_argument("--batch", type=int, default=64, help="paper Table 7 batch size")
            p.add_argument("--cpu-steps", type=int, default=2)
            p.add_argument("--gpu-steps", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
