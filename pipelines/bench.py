"""Data pipeline throughput: multi-crop images/s of DALI on the GPU, DALI on the CPU and torchvision.

    flashdino data bench --data DIR [--make-jpegs 2000] [--batch-size 256] [--workers 16]

DIR is an image folder (class sub-folders or flat). --make-jpegs N first fills DIR with an
ImageNet-like JPEG set (random crops of the real photos installed on this machine, ~500x375,
quality 90) when it holds no images. Each variant runs --warmup batches, then times --batches
batches of 2 global + L local crops (recipe sizes by default). Results are printed and written as
JSON and Markdown (date, device, versions, the exact command) to --output.
Variants that cannot run here (DALI-GPU without a GPU) are reported as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

VARIANTS = ("dali-gpu", "dali-cpu", "torchvision")
PHOTO_GLOBS = ("/usr/share/backgrounds/mate/nature/*.jpg", "/usr/share/libjxl-testdata/jxl/flower/*.jpg")
# A folder of source photos for machines without the Debian packages (the GPU machine gets the
# ones scripts/gpu_prepare.sh carries); it takes precedence over PHOTO_GLOBS when set.
PHOTOS_ENV = "FLASHDINO_PHOTOS"


def photos_in(folder: str) -> List[str]:
    """The JPEG/PNG files directly in `folder`, sorted."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))


def default_photo_paths() -> List[str]:
    folder = os.environ.get(PHOTOS_ENV)
    if folder:
        return photos_in(folder) if os.path.isdir(folder) else []
    return sorted(p for g in PHOTO_GLOBS for p in glob.glob(g))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="image folder (created and filled with --make-jpegs)")
    parser.add_argument("--make-jpegs", type=int, default=0, metavar="N",
                        help="if DIR has no images, first write N ImageNet-like JPEGs there (from the installed photos)")
    parser.add_argument("--photos", default=None, metavar="DIR",
                        help="source photos for --make-jpegs (default: the Debian packages' photos, see shared/DATA.md); "
                             "a machine without them (the GPU machine) gets a folder of them carried along")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=10)
    parser.add_argument("--blur", default="pil", choices=("pil", "torchvision"))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                        help="torchvision DataLoader workers and DALI external-source worker processes")
    parser.add_argument("--threads", type=int, default=None, help="DALI CPU threads (default: half the cores, max 8; DALI-CPU: all cores)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per variant")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"), help="output dtype of the crops")
    parser.add_argument("--params", default="fast", choices=("fast", "reference"), help="DALI parameter sampler")
    parser.add_argument("--no-plugin", action="store_true", help="DALI: use the built-in op chain, not the native operator")
    parser.add_argument("--device", type=int, default=0, help="GPU for DALI-GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/data_bench", help="folder for the JSON and Markdown results")
    parser.add_argument("--vit-step", type=int, default=0, metavar="STEPS",
                        help="DALI-GPU only: also time STEPS ViT-B/16 student steps (fwd+bwd+AdamW, bf16) fed by the "
                             "pipeline vs on one fixed batch; reports the pipeline's share of step time")


# ------------------------------------------------------------------------------------------
# test data
# ------------------------------------------------------------------------------------------
def make_jpeg_set(out_dir: str, n: int, size=(500, 375), quality: int = 90, n_classes: int = 10, seed: int = 0,
                  sources: Optional[List[str]] = None) -> List[str]:  # fmt: skip
    """Write `n` JPEGs like ImageNet's (random crops of real photos, `size`, `quality`) into class folders.

    The photos are the ones installed by the Debian packages mate-backgrounds and libjxl-testdata
    (see shared/DATA.md); each class folder takes its crops from one photo. Returns the paths.
    """
    import numpy as np
    from PIL import Image

    paths = sources if sources is not None else default_photo_paths()
    if not paths:
        where = os.environ.get(PHOTOS_ENV) or ", ".join(PHOTO_GLOBS)
        raise FileNotFoundError(f"make_jpeg_set: no source photos found under {where} (install mate-backgrounds "
                                f"and libjxl-testdata, or point {PHOTOS_ENV} at a folder of photos)")
    rng = np.random.default_rng(seed)
    photos = []
    for p in paths[: max(n_classes, 1)]:
        with Image.open(p) as img:
            img = img.convert("RGB")
            img.thumbnail((1600, 1600), Image.Resampling.BICUBIC)  # keep the source small: fast crops
            photos.append(img.copy())
    written = []
    for i in range(n):
        c = i % len(photos)
        photo = photos[c]
        w, h = size if rng.random() < 0.8 else size[::-1]  # mostly landscape, some portrait
        scale = rng.uniform(0.35, 1.0)
        cw = max(8, int(min(photo.width, photo.height * w / h) * scale))
        ch = max(8, int(cw * h / w))
        x0 = int(rng.integers(0, photo.width - cw + 1))
        y0 = int(rng.integers(0, photo.height - ch + 1))
        crop = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
        folder = os.path.join(out_dir, f"class_{c:03d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img_{i:06d}.jpg")
        crop.save(path, "JPEG", quality=quality)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------
def _config(args, pipeline: str):
    from flashdino.engine.config import build_config

    overrides = [
        f"data.path={args.data}", f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"data.pipeline={pipeline}", f"crops.global_size={args.global_size}", f"crops.local_size={args.local_size}",
        f"crops.n_local={args.n_local}", f"crops.blur={args.blur}", f"train.precision={args.precision}",
        f"train.seed={args.seed}",
    ]  # fmt: skip
    return build_config(None, overrides=overrides)


def _time_loader(loader, batches: int, warmup: int, sync=None) -> Dict[str, float]:
    it = iter(loader)
    n_images = 0
    for _ in range(warmup):
        next(it)
    if sync:
        sync()
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        n_images += batch["global_crops"].shape[0] // 2
    if sync:
        sync()
    seconds = time.perf_counter() - start
    return {"images": n_images, "seconds": seconds, "images_per_s": n_images / seconds}


def run_variant(args, variant: str) -> Dict[str, Any]:
    import torch

    cfg = _config(args, "torchvision" if variant == "torchvision" else "dali")
    need = (args.batches + args.warmup) * args.batch_size
    result: Dict[str, Any] = {"variant": variant}
    if variant == "torchvision":
        from flashdino.pipelines.loader import build_train_loader

        loader, sampler, reader = build_train_loader(cfg)
        result.update(workers=args.workers)
    else:
        from flashdino.pipelines.dali import build_dali_loader
        from flashdino.pipelines.dali import plugin as plugin_mod

        on_gpu = variant == "dali-gpu"
        if on_gpu and not torch.cuda.is_available():
            return {"variant": variant, "skipped": "no CUDA GPU on this machine"}
        loader, sampler, reader = build_dali_loader(
            cfg, device_id=args.device if on_gpu else None, params=args.params,
            use_plugin=False if args.no_plugin else None,
        )  # fmt: skip
        if args.threads:
            loader.num_threads = args.threads
        elif not on_gpu:
            loader.num_threads = os.cpu_count() or 1  # all CPU work is DALI's here
        result.update(
            native_plugin=loader.use_plugin, fallback_reason=None if loader.use_plugin else plugin_mod.unavailable_reason(),
            dali_threads=loader.num_threads, py_workers=loader.py_workers, params=args.params,
        )  # fmt: skip
    if len(reader) < need:
        result["note"] = f"dataset has {len(reader)} images < {need} needed; epochs wrap"
    sync = torch.cuda.synchronize if variant == "dali-gpu" else None
    stats = _run_epochs(loader, sampler, args.batches, args.warmup, sync)
    result.update(stats)
    if variant == "dali-gpu" and args.vit_step > 0:
        add_vit_step(result, loader, sampler, args.vit_step, args.device)
    if hasattr(loader, "close"):
        loader.close()
    return result


def add_vit_step(result: Dict[str, Any], loader, sampler, steps: int, device_index: int) -> None:
    """result["vit_step"], or result["vit_step_error"] when the measurement fails (e.g. out of
    memory): the throughput already in `result` stands either way."""
    try:
        result["vit_step"] = vit_step_share(loader, sampler, steps, device_index)
    except Exception as exc:
        result["vit_step_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]


def _run_epochs(loader, sampler, batches, warmup, sync):
    """Time `batches` batches after `warmup`, crossing epoch boundaries when the set is small."""

    class _Cycle:
        def __iter__(self):
            epoch = 0
            while True:
                sampler.set_epoch(epoch)
                yield from loader
                epoch += 1

    return _time_loader(_Cycle(), batches, warmup, sync)


VIT_MICRO_BATCH = 64  # images per forward/backward in vit_step_share (issue 6's ViT-B/16 setting)


def micro_batches(batch: Dict[str, Any], size: int):
    """(global, local) crops of `size` images at a time, every view of those images included.

    Crops are view-major: rows v*B .. v*B+B-1 hold view v of the batch's B images."""
    import torch

    B = batch["global_crops"].shape[0] // 2
    local = batch["local_crops"]
    n_local = 0 if local is None else local.shape[0] // B
    for s in range(0, B, size):
        e = min(s + size, B)
        g = torch.cat([batch["global_crops"][v * B + s: v * B + e] for v in range(2)])
        l = torch.cat([local[v * B + s: v * B + e] for v in range(n_local)]) if n_local else None
        yield g, l


def vit_step_share(loader, sampler, steps: int, device_index: int = 0) -> Dict[str, float]:
    """Time ViT-B/16 student steps on one fixed batch, then fed by the loader each step.

    The difference is what the pipeline costs the training step (its GPU kernels competing with the
    model's, plus any wait for data): share = 1 - t_fixed / t_fed. The step is the SimDINO student's
    backbone pass over all crops (the dominant cost of a real step), backward and AdamW, in bf16.
    One step consumes the whole loader batch in micro-batches of VIT_MICRO_BATCH images (gradient
    accumulation): a ViT-B graph over 256 images x 12 crops does not fit in 80 GB.
    """
    import torch

    from flashdino.engine.config import build_config
    from flashdino.engine.models import build_backbone

    device = torch.device("cuda", device_index)
    model = build_backbone(build_config("simdino_vitb16").model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(batch):
        for global_crops, local_crops in micro_batches(batch, VIT_MICRO_BATCH):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(global_crops).float().square().mean()
                if local_crops is not None:
                    out = out + model(local_crops).float().square().mean()
            out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def batches():
        epoch = 10_000  # epochs apart from the throughput run
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    feed = batches()
    fixed = next(feed)
    for _ in range(3):
        step(fixed)
        step(next(feed))
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(fixed)
    torch.cuda.synchronize(device)
    t_fixed = (time.perf_counter() - t0) / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        step(next(feed))
    torch.cuda.synchronize(device)
    t_fed = (time.perf_counter() - t0) / steps
    return {"step_s_fixed_batch": t_fixed, "step_s_fed_by_pipeline": t_fed,
            "pipeline_share": max(0.0, 1.0 - t_fixed / t_fed)}  # fmt: skip


def environment(device_index: int, command: str) -> Dict[str, Any]:
    """The harnesses' run metadata (date, device, driver, versions, commit, command) plus the CPU,
    whose cores feed the CPU variants."""
    import torch

    from flashdino.profiling.env import cpu_model, run_metadata

    device = torch.device("cuda", device_index) if torch.cuda.is_available() else torch.device("cpu")
    meta = run_metadata(device, command)
    meta["cpu"] = {"model": cpu_model(), "cores": os.cpu_count()}
    return meta


def to_markdown(report: Dict[str, Any]) -> str:
    from flashdino.profiling.env import describe

    meta, a = report["meta"], report["settings"]
    lines = ["# flashdino data bench", ""] + describe(meta) + [
        f"- CPU: {meta['cpu']['model']} ({meta['cpu']['cores']} logical cores)",
        f"- crops: 2 x {a['global_size']} + {a['n_local']} x {a['local_size']}, batch {a['batch_size']}, "
        f"{a['precision']}, blur {a['blur']}, {a['batches']} timed batches after {a['warmup']}",
        "",
        "| variant | images/s | notes |",
        "|---|---:|---|",
    ]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | - | skipped: {r['skipped']} |")
            continue
        notes = []
        if "native_plugin" in r:
            notes.append("native operator" if r["native_plugin"] else f"built-in chain ({r.get('fallback_reason')})")
            notes.append(f"{r['dali_threads']} DALI threads, {r['py_workers']} source workers, params {r['params']}")
        if "workers" in r:
            notes.append(f"{r['workers']} workers")
        if "note" in r:
            notes.append(r["note"])
        if "error" in r:
            notes.append(f"error: {r['error']}")
        if "vit_step_error" in r:
            notes.append(f"ViT-B/16 step not measured: {r['vit_step_error']}")
        if "vit_step" in r:
            v = r["vit_step"]
            notes.append(f"ViT-B/16 step {v['step_s_fixed_batch'] * 1e3:.1f} ms on a fixed batch, "
                         f"{v['step_s_fed_by_pipeline'] * 1e3:.1f} ms fed by the pipeline: share {100 * v['pipeline_share']:.1f}%")
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
        lines.append(f"| {r['variant']} | {ips} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        print(f"flashdino data bench: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    has_images = os.path.isdir(args.data) and any(
        f.lower().endswith((".jpg", ".jpeg", ".png")) for _, _, fs in os.walk(args.data) for f in fs
    )
    if not has_images:
        if args.make_jpegs <= 0:
            print(f"flashdino data bench: no images in '{args.data}' (use --make-jpegs N to generate a set)", file=sys.stderr)
            return 2
        print(f"writing {args.make_jpegs} JPEGs to {args.data} ...", flush=True)
        sources = None
        if args.photos:
            sources = photos_in(args.photos)
            if not sources:
                print(f"flashdino data bench: no photos in --photos '{args.photos}'", file=sys.stderr)
                return 2
        make_jpeg_set(args.data, args.make_jpegs, seed=args.seed, sources=sources)
    from flashdino.profiling.env import cli_command

    report = {
        "meta": environment(args.device, cli_command("data bench", args)),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and not callable(v)},
        "results": [],
    }
    for variant in variants:
        print(f"[{variant}] running ...", flush=True)
        try:
            r = run_variant(args, variant)
        except Exception as exc:  # one broken variant must not hide the others' numbers
            r = {"variant": variant, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        report["results"].append(r)
        if "images_per_s" in r:
            print(f"[{variant}] {r['images_per_s']:.1f} images/s ({r['images']} images in {r['seconds']:.2f} s)", flush=True)
        else:
            print(f"[{variant}] {r.get('skipped') or r.get('error')}", flush=True)
    os.makedirs(args.output, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.output, f"data_bench_{stamp}")
    with open(base + ".json", "w") as fh:
        json.dump(report, fh, indent=2, default=str)
    with open(base + ".md", "w") as fh:
        fh.write(to_markdown(report))
    print(to_markdown(report))
    print(f"results: {base}.json, {base}.md")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="flashdino data bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
