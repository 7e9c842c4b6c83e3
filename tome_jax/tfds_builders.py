"""The tfds builders of the local sources (`tome_jax.sources.get_builder` uses them)."""

from __future__ import annotations

import os
from pathlib import Path

import tensorflow_datasets as tfds

from tome_jax.sources import FASHION_MNIST_DIR, FASHION_MNIST_FILES


class FashionMnistLocal(tfds.image_classification.FashionMNIST):
    """tfds `fashion_mnist` read from local idx files instead of the network.

    Same features, labels and splits as `fashion_mnist`; the manual dir holds the four files of
    `FASHION_MNIST_FILES` (Debian: `apt-get install -y dataset-fashion-mnist`).
    """

    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put {sorted(FASHION_MNIST_FILES.values())} in the manual dir, e.g. "
        "`apt-get install -y dataset-fashion-mnist` (files in "
        f"{FASHION_MNIST_DIR}).")

    def _split_generators(self, dl_manager):
        files = dl_manager.extract(
            {k: os.path.join(dl_manager.manual_dir, v) for k, v in FASHION_MNIST_FILES.items()})
        return [tfds.core.SplitGenerator(
            name=split, gen_kwargs=dict(num_examples=n, data_path=files[f"{split}_data"],
                                        label_path=files[f"{split}_labels"]))
            for split, n in (("train", 60_000), ("test", 10_000))]


class ImagenetSample(tfds.core.GeneratorBasedBuilder):
    """The 100 ImageNet photos of `shared/data/imagenet-sample-100`, one `validation` split.

    Files are `<wnid>_<name>.JPEG`; the label is the line index of the wnid in
    `wnids-1000.txt` (the standard ImageNet-1k class order).
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "The manual dir is `shared/data/imagenet-sample-100`."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=1000),
                "file_name": tfds.features.Text()}),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples(Path(dl_manager.manual_dir))}

    def _generate_examples(self, folder: Path):
        wnids = (folder / "wnids-1000.txt").read_text().split()
        index = {w: i for i, w in enumerate(wnids)}
        for path in sorted(folder.glob("*.JPEG")):
            wnid = path.name.split("_", 1)[0]
            if wnid not in index:
                raise ValueError(f"{path.name}: wnid {wnid!r} is not in wnids-1000.txt")
            yield path.name, {"image": str(path), "label": index[wnid], "file_name": path.name}
