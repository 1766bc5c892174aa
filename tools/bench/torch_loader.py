"""What users run today, for the loader bench: torchvision's ImageFolder with the official
SimMIM transform (RandomResizedCrop scale 0.67-1, ratio 3:4-4:3, flip, ToTensor, Normalize)
and mask generator (data_simmim.py), in a torch DataLoader with `--workers` processes.
Prints one JSON line: images/s over `--seconds` after a warm-up.

  python tools/bench/torch_loader.py --root DIR --size 192 --workers 2 --seconds 10
"""
import argparse
import json
import time

import numpy as np
import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


class MaskGenerator:
    """The official SimMIM mask generator."""

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))

    def __call__(self):
        mask_idx = np.random.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


class SimMIMTransform:
    """The official pretraining transform (data_simmim.py)."""

    def __init__(self, size):
        self.transform_img = T.Compose([
            T.Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
            T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=torch.tensor(IMAGENET_DEFAULT_MEAN), std=torch.tensor(IMAGENET_DEFAULT_STD)),
        ])
        self.mask_generator = MaskGenerator(input_size=size, mask_patch_size=32, model_patch_size=4)

    def __call__(self, img):
        return self.transform_img(img), self.mask_generator()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    dataset = ImageFolder(args.root, transform=SimMIMTransform(args.size))
    # Few files: list them again and again, as the Rust bench does.
    length = max(len(dataset), 4 * args.batch)
    dataset = Subset(dataset, [i % len(dataset) for i in range(length)])
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
    images, started, warm = 0, None, 0
    while True:
        for batch, _ in loader:
            if started is None:
                warm += 1
                if warm == 2:
                    started = time.perf_counter()
                continue
            images += batch[0].shape[0]
            if time.perf_counter() - started >= args.seconds:
                print(json.dumps({"impl": "torchvision", "size": args.size, "threads": args.workers,
                                  "images_per_s": images / (time.perf_counter() - started)}))
                return


if __name__ == "__main__":
    main()
