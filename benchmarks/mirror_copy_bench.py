"""How fast a worker's state reaches a device mirror slot: the same bytes copied device to
device by three methods, on an idle GPU (GPU time from CUDA events, median of 10).

    python benchmarks/mirror_copy_bench.py

The tensors have the shapes of the ~1B GPT of ``recovery_gpu_train.py`` with AdamW (fp32
parameters and two moments: 10.9 GB); the slot is one allocation, each tensor at a 64-byte
aligned offset, as :mod:`elastictrain.snapshot.device_mirror` lays it out.
"""

from __future__ import annotations

import statistics

import torch

from elastictrain.snapshot.device_mirror import widened_pairs


def _shapes(layers: int = 16, width: int = 2048, vocab: int = 50304) -> list[tuple[int, ...]]:
    per_layer = [(3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width),
                 (4 * width,), (width, 4 * width), (width,), (width,), (width,), (width,),
                 (width,)]  # fmt: skip
    return [(vocab, width), (2048, width)] + per_layer * layers + [(width,), (width,)]


def main() -> None:
    device = torch.device("cuda")
    sources = [torch.randn(s, device=device) for s in _shapes() for _ in range(3)]
    offsets, at = [], 0
    for t in sources:
        offsets.append(at)
        at = (at + t.numel() * t.element_size() + 63) // 64 * 64
    slot = torch.empty(at, dtype=torch.uint8, device=device)
    src_bytes = [t.view(-1).view(torch.uint8) for t in sources]
    dst_bytes = [slot[o : o + s.numel()] for o, s in zip(offsets, src_bytes, strict=True)]
    wide = widened_pairs(dst_bytes, src_bytes)

    def foreach_bytes():
        torch._foreach_copy_(dst_bytes, src_bytes)

    def foreach_wide():
        for dsts, srcs in wide:
            torch._foreach_copy_(dsts, srcs)

    def per_tensor():
        for d, s in zip(dst_bytes, src_bytes, strict=True):
            d.copy_(s)

    total = sum(s.numel() for s in src_bytes)
    print(f"\n{len(sources)} tensors, {total / 1e9:.2f} GB, {torch.cuda.get_device_name()}\n")
    print("| method | GPU ms | GB/s (read) |\n|---|--:|--:|")
    for name, fn in (("foreach copy, uint8 views", foreach_bytes),
                     ("foreach copy, widest views (int64/int32/...)", foreach_wide),
                     ("one copy_ per tensor", per_tensor)):  # fmt: skip
        times = []
        for _ in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times[2:])
        print(f"| {name} | {ms:.2f} | {total / ms / 1e6:.0f} |")
        assert all(torch.equal(d, s) for d, s in zip(dst_bytes, src_bytes, strict=True))
        slot.zero_()


if __name__ == "__main__":
    main()
