"""Publishing, downloading, streaming with a cache, importing, and verify --quick, measured side by side.

Everything runs on this machine with real files: a source of real photos (JPEG tiles cut from the two photos
scikit-learn ships, ImageNet-like sizes), an apple/ml-dr-style release for it written with torch.save from the
public format description (synthetic teacher probabilities: a peaked 1000-class distribution per image), that
release imported into a store, the store published to a directory and served on loopback by
``tests/range_server.py``.

1. download throughput: ``reinforce download`` (4 and 1 workers, sha256-checked, resumable) vs a plain
   single-stream copy of the same files from the same server (one ``requests`` session, no checks), on a
   larger store written with synthetic records (no source needed to download);
2. bytes fetched per training epoch streaming that store from the server, with and without ``cached_store``,
   over a cycle of A epochs, the next epochs and a second run (one chunk per block per epoch, as
   ReinforcedDataset reads them);
3. import speed (files/s, 1 and 2 workers) and bytes per record of the imported store vs the release files;
4. replay fidelity of imported records: the teacher's view as ml-dr made it (PIL crop + bilinear resize + flip)
   vs this project's replay of the stored record (mean and max absolute pixel difference);
5. ``verify --quick`` (source manifest: names, sizes, sha256) vs ``verify --data`` (decode + fingerprint).

    PYTHONPATH=.:loaders python benchmarks/publish.py [--images 1000] [--records 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from range_server import RangeServer  # noqa: E402

from reinforce.share.download import DownloadOptions, cached_store, download  # noqa: E402
from reinforce.importers import convert  # noqa: E402
from reinforce.importers import ml_dr  # noqa: E402
from reinforce.share.manifest import MANIFEST_NAME, Manifest  # noqa: E402
from reinforce.share.publish import publish  # noqa: E402
from reinforce.tools.verify import verify_store  # noqa: E402
from reinforce.build.writer import BlockResult, StoreWriter  # noqa: E402
from reinforce_loaders import AugmentPipeline  # noqa: E402
from reinforce_loaders import format as fmt  # noqa: E402
from reinforce_loaders.rng import slot_for_epoch  # noqa: E402
from reinforce_loaders.source import ImageSource, decode_image  # noqa: E402

CLASSES, TOP_K, OUTPUT = 1000, 10, 224
IMPORT_BLOCK = 128
"""Samples per block of the imported store: 8 blocks of work for 1000 images (the default, 512, gives 2)."""
EXTRA_EPOCHS = 4
"""Epochs of the second cycle measured for the cache (every one reads only what the first cycle read)."""


def make_photo_source(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEG tiles (200-420 px sides) of scikit-learn's sample photos in 10 class folders."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for index in range(count):
        photo = photos[index % len(photos)]
        h, w = int(rng.integers(200, 421)), int(rng.integers(200, 421))
        top, left = int(rng.integers(0, photo.height - h + 1)), int(rng.integers(0, photo.width - w + 1))
        tile = photo.crop((left, top, left + min(w, photo.width - left), top + h))
        folder = root / f"class{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        tile.save(folder / f"{index:06d}.jpg", quality=90)
    return root


def make_ml_dr_release(source: Path, root: Path, records: int, seed: int = 0) -> int:
    """An ml-dr-style release (torch.save, pickle protocol 4) with RRC + flip + RandAugment + RandomErasing
    parameters drawn by this project's samplers, in ml-dr's layout. Returns the release's bytes."""
    root.mkdir(parents=True)
    augmentation = {"random_resized_crop": {"enable": True, "size": OUTPUT}, "random_horizontal_flip": {"enable": True},
                    "rand_augment": {"enable": True}, "random_erase": {"enable": True, "p": 0.25}}
    torch.save({"reinforce": {"num_samples": records, "topk": TOP_K, "compress": True,
                              "image_augmentation": augmentation}}, root / "config.pth.tar", pickle_protocol=4)
    pipeline = AugmentPipeline.from_config({"size": OUTPUT, "ops": [
        {"name": "random_resized_crop"}, {"name": "horizontal_flip"}, {"name": "rand_augment"},
        {"name": "random_erasing"}]})
    images = ImageSource.from_folder(source)
    rng = np.random.default_rng(seed)
    for index in range(len(images)):
        with Image.open(images.name_of(index)) as image:
            width, height = image.size
        params = pipeline.sample_slots(seed, index, records, height, width)
        main_class = int(rng.integers(CLASSES))
        release = []
        for row in params:
            logits = rng.normal(size=CLASSES)
            logits[main_class] += rng.uniform(2, 8)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            ids = np.argpartition(-probs, TOP_K)[:TOP_K]
            erase = None if row[11] == 0 else tuple(int(round(v * OUTPUT)) for v in row[9:13])
            release.append({"params": [tuple(int(v) for v in row[:4]), bool(row[4]),
                                       [(int(row[5]), int(row[6])), (int(row[7]), int(row[8]))], erase],
                            "prob": (torch.tensor(probs[ids]), torch.tensor(ids))})
        torch.save((index, release), root / f"{index}.pth.tar", pickle_protocol=4)
    return sum(path.stat().st_size for path in root.glob("*.pth.tar") if path.name != "config.pth.tar")


def synthetic_store(out: Path, samples: int, slots: int, seed: int = 0) -> Path:
    """A store of ``samples`` x ``slots`` records (RRC + flip on 256-400 px sources, a peaked 1000-class top-10),
    written by the StoreWriter block by block: the size of a real store without a source to decode."""
    pipeline = AugmentPipeline.from_config({"size": OUTPUT, "ops": [{"name": "random_resized_crop"},
                                                                    {"name": "horizontal_flip"}]})
    header = fmt.StoreHeader(num_samples=samples, num_classes=CLASSES, top_k=TOP_K, num_augmentations=slots,
                             seed=seed, block_size=1024, augmentation=pipeline.config(),
                             teachers=[{"name": "synthetic", "input_size": OUTPUT, "mean": [0.5] * 3,
                                        "std": [0.5] * 3, "weights_sha256": "0" * 64}],
                             param_encodings=fmt.pipeline_param_encodings(pipeline),
                             class_vocabulary_size=fmt.default_class_vocabulary_size(CLASSES, slots, TOP_K))
    writer = StoreWriter.create_or_resume(out, header, pipeline.num_params)
    rng = np.random.default_rng(seed)
    for block in range(header.num_blocks):
        start, stop = header.block_range(block)
        n = stop - start
        sizes = rng.integers(256, 401, size=(n, 2))
        h = (sizes[:, :1] * rng.uniform(0.3, 1, (n, slots))).astype(int)
        w = (sizes[:, 1:] * rng.uniform(0.3, 1, (n, slots))).astype(int)
        params = np.stack([(sizes[:, :1] - h) * rng.uniform(0, 1, (n, slots)) // 1,
                           (sizes[:, 1:] - w) * rng.uniform(0, 1, (n, slots)) // 1, h, w,
                           rng.integers(0, 2, (n, slots))], -1).astype(np.float64)
        params = header.layout.params.quantize(params, sizes[:, :1], sizes[:, 1:])
        main = rng.integers(CLASSES, size=(n, 1, 1))
        near = (main + rng.integers(-20, 21, size=(n, slots, 3 * TOP_K))) % CLASSES
        ids = np.array([list(dict.fromkeys(row))[:TOP_K] for row in near.reshape(-1, 3 * TOP_K)]).reshape(n, slots, -1)
        probs = np.sort(rng.dirichlet(np.full(TOP_K, 0.3), size=(n, slots)) * 0.95, axis=-1)[..., ::-1]
        writer.write_block(block, BlockResult(start=start, labels=main[:, 0, 0] % 10, image_sizes=sizes,
                                              fingerprints=rng.integers(1, 2**63, size=n, dtype=np.uint64),
                                              aug_params=params, topk_indices=ids, topk_probs=probs,
                                              teacher_entropy=np.full((n, slots), 2.0)))
    writer.finalize()
    return out


def timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def plain_copy(url: str, manifest: Manifest, dest: Path) -> None:
    """The baseline: every file of the manifest, one after the other, over one connection, no checks."""
    with requests.Session() as session:
        for entry in manifest.files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            with session.get(f"{url}/{entry.path}", stream=True) as response, open(target, "wb") as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)


def measure_download(publication: Path, work: Path, repeats: int) -> None:
    manifest = Manifest.from_bytes((publication / MANIFEST_NAME).read_bytes())
    megabytes = manifest.total_bytes / 1e6
    with RangeServer(publication) as server:
        runs: dict[str, list[float]] = {"plain single-stream copy": [], "download, 1 worker": [],
                                        "download, 4 workers": []}
        for repeat in range(repeats):
            runs["plain single-stream copy"].append(timed(lambda: plain_copy(server.url, manifest, work / f"p{repeat}")))
            for workers in (1, 4):
                options = DownloadOptions(workers=workers, progress=False, verify=False)
                runs[f"download, {workers} worker{'s' if workers > 1 else ''}"].append(
                    timed(lambda: download(server.url, work / f"d{workers}-{repeat}", options)))
        rerun = timed(lambda: download(server.url, work / "d4-0", DownloadOptions(progress=False, verify=False)))
    baseline = statistics.median(runs["plain single-stream copy"])
    print(f"\n### Download: {len(manifest.files)} files, {megabytes:.1f} MB, loopback, median of {repeats}\n")
    print("| method | median s | MB/s | time vs plain copy |\n| --- | --- | --- | --- |")
    for name, seconds in runs.items():
        median = statistics.median(seconds)
        print(f"| {name} | {median:.2f} | {megabytes / median:.1f} | {median / baseline:.2f}x |")
    print(f"| re-run on the complete copy (re-hash only) | {rerun:.2f} | - | {rerun / baseline:.2f}x |")


def epoch_bytes(group, header, server: RangeServer, epoch: int) -> int:
    before = len(server.log)
    slot = slot_for_epoch(header.seed, epoch, 0, header.num_augmentations)
    for block in range(header.num_blocks):
        fmt.read_block_slot(group, header, block, slot)
    return sum(request.bytes for request in server.log[before:])


def measure_cache(publication: Path, store_dir: str, work: Path) -> None:
    with RangeServer(publication) as server:
        url = f"{server.url}/{store_dir}"
        rows = {}
        for name, make in (("no cache", lambda: url), ("cached_store, first run", lambda: cached_store(url, work)),
                           ("cached_store, second run", lambda: cached_store(url, work))):
            group = fmt.open_store_group(make())
            header = fmt.read_header(group)
            a = header.num_augmentations
            per_epoch = [epoch_bytes(group, header, server, epoch) for epoch in range(a + EXTRA_EPOCHS)]
            rows[name] = (sum(per_epoch[:a]) / a, sum(per_epoch[a:]) / EXTRA_EPOCHS, per_epoch[0])
    print(f"\n### Bytes fetched per epoch streaming from loopback HTTP (A = {a}, {header.num_blocks} blocks)\n")
    print(f"| store | epoch 0 | mean, epochs 0..A-1 | mean, epochs A..A+{EXTRA_EPOCHS - 1} |\n| --- | --- | --- | --- |")
    for name, (first, second, zero) in rows.items():
        print(f"| {name} | {zero:,} | {first:,.0f} | {second:,.0f} |")


def measure_import(release: Path, source: Path, work: Path, release_bytes: int, records: int) -> Path:
    print(f"\n### Import (ml-dr release -> store, blocks of {IMPORT_BLOCK} samples)\n")
    print("| workers | seconds | files/s |\n| --- | --- | --- |")
    out = None
    for workers in (1, 2):
        out = work / f"imported-{workers}.zarr"
        plan = ml_dr.plan_import(release, source, trust_pickle=True, num_classes=CLASSES, block_size=IMPORT_BLOCK)
        summary = convert(plan, out, workers=workers, progress=False)
        print(f"| {workers} | {summary.seconds:.1f} | {summary.files_per_second:.1f} |")
    group = fmt.open_store_group(out)
    header = fmt.read_header(group)
    stored = sum(p.stat().st_size for p in (out / fmt.RECORDS).rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    count = header.num_samples * records
    print(f"\nrelease: {release_bytes / count:.1f} bytes/record ({release_bytes:,} bytes); imported store: "
          f"{stored / count:.2f} bytes/record in `records` ({total / count:.2f} with every array), "
          f"{release_bytes / total:.1f}x smaller")
    return out


def pil_view(image: Image.Image, top: int, left: int, height: int, width: int, flip: bool) -> np.ndarray:
    """The teacher's view as ml-dr's PIL pipeline makes it: crop, bilinear resize, flip."""
    view = image.crop((left, top, left + width, top + height)).resize((OUTPUT, OUTPUT), Image.Resampling.BILINEAR)
    return np.asarray(view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else view, dtype=np.int16)


def measure_fidelity(store: Path, source: Path, samples: int = 40, slots: int = 8) -> None:
    group = fmt.open_store_group(store)
    header = fmt.read_header(group)
    decoded = fmt.read_all_records(group, header)
    pipeline = AugmentPipeline.from_config({"size": OUTPUT, "ops": header.augmentation["ops"][:2]})
    images = ImageSource.from_folder(source)
    differences = []
    for index in np.linspace(0, header.num_samples - 1, samples).astype(int):
        tensor = decode_image(images.name_of(index))
        with Image.open(images.name_of(index)) as raw:
            photo = raw.convert("RGB")
        for slot in range(slots):
            params = decoded.params[index, slot, :5]
            ours = pipeline.apply(tensor, params).permute(1, 2, 0).numpy().astype(np.int16)
            theirs = pil_view(photo, *(int(v) for v in params[:4]), bool(params[4]))
            differences.append(np.abs(ours - theirs))
    stacked = np.stack(differences)
    print(f"\n### Replay fidelity of imported crops ({len(differences)} records, crop + flip only)\n")
    print(f"mean |PIL view - replay| = {stacked.mean():.2f} of 255; 99th percentile {np.percentile(stacked, 99):.0f}; "
          f"max {stacked.max()}; pixels equal: {(stacked == 0).mean() * 100:.1f} %")


def measure_verify(publication: Path, store_dir: str, source: Path, repeats: int) -> None:
    store = publication / store_dir
    runs: dict[str, list[float]] = {"store": [], "quick": [], "data": []}
    for _ in range(repeats):  # interleaved, so load on the machine affects all three alike
        runs["store"].append(timed(lambda: verify_store(store)))
        runs["quick"].append(timed(lambda: verify_store(store, source, quick=True)))
        runs["data"].append(timed(lambda: verify_store(store, source)))
    r, q, f = (statistics.median(runs[name]) for name in ("store", "quick", "data"))
    print(f"\n### verify --quick vs verify --data ({len(ImageSource.from_folder(source))} JPEG files), median of "
          f"{repeats}\n")
    print("| command | median s | source check (minus the store-only run) |\n| --- | --- | --- |")
    print(f"| verify (store only) | {r:.2f} | - |")
    print(f"| verify --data --quick | {q:.2f} | {q - r:.2f} |")
    print(f"| verify --data | {f:.2f} | {f - r:.2f} |")
    print(f"\nwhole command: --quick takes {q / f:.2f}x the time of --data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="photos of the import and verify source")
    parser.add_argument("--records", type=int, default=64, help="records per photo in the ml-dr-style release")
    parser.add_argument("--samples", type=int, default=65536, help="samples of the synthetic store downloaded")
    parser.add_argument("--slots", type=int, default=64, help="records per sample of the synthetic store")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="reinforce-bench-publish-") as tmp:
        work = Path(tmp)
        source = make_photo_source(work / "photos", args.images)
        release_bytes = make_ml_dr_release(source, work / "release", args.records)
        store = measure_import(work / "release", source, work, release_bytes, args.records)
        measure_fidelity(store, source)
        publication = work / "publication"
        publish(store, str(publication), source=source)
        measure_verify(publication, store.name, source, args.repeats)
        synthetic = work / "synthetic-publication"
        publish(synthetic_store(work / "synthetic.zarr", args.samples, args.slots), str(synthetic))
        measure_download(synthetic, work / "downloads", args.repeats)
        shutil.rmtree(work / "downloads", ignore_errors=True)
        streamed = work / "streamed-publication"  # fewer slots: a cycle of A epochs is A x blocks x 2 requests
        publish(synthetic_store(work / "streamed.zarr", args.samples // 4, args.slots // 4), str(streamed))
        measure_cache(streamed, "streamed.zarr", work / "cache")


if __name__ == "__main__":
    main()
